// A collaborative editor on a crdtsync relay, from stock Yjs packages only:
// y-websocket (the relay speaks its protocol), y-indexeddb (the tab keeps working offline
// and after a reload), CodeMirror 6 through y-codemirror.next (text and presence cursors).
//
// The page URL says what to edit and where:
//   ?doc=demo                    the document (default "demo")
//   &relay=ws://127.0.0.1:8765   the relay (default: what serve.py says in config.json,
//                                else ws://<this page's host>:8765)
//   &name=alice                  your name in the others' cursors (default: remembered
//                                in this browser, or a guest name)

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { IndexeddbPersistence } from 'y-indexeddb'
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next'
import { basicSetup } from 'codemirror'
import { EditorView, keymap } from '@codemirror/view'

const COLORS = ['#d1495b', '#2e86ab', '#3b8b4f', '#8e44ad', '#e67e22', '#16a085', '#c0392b', '#2c3e50']

const params = new URLSearchParams(window.location.search)

/** The relay URL: ?relay=, else serve.py's config.json, else port 8765 on this host. */
async function relayUrl () {
  if (params.get('relay')) return params.get('relay')
  try {
    const answer = await fetch('config.json', { cache: 'no-store' })
    if (answer.ok) {
      const config = await answer.json()
      if (config.relay) return config.relay
    }
  } catch (_) {
    // no config.json: served by another static server, or offline after a reload
  }
  const host = window.location.hostname || '127.0.0.1'
  return `ws://${host.includes(':') ? `[${host}]` : host}:8765`
}

function userName () {
  const given = params.get('name')
  if (given) return given
  let name = window.localStorage.getItem('crdtsync-demo-name')
  if (!name) {
    name = `guest-${Math.floor(Math.random() * 9000 + 1000)}`
    window.localStorage.setItem('crdtsync-demo-name', name)
  }
  return name
}

function colorOf (name) {
  let hash = 0
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0
  return COLORS[hash % COLORS.length]
}

function setStatus (state, text) {
  const el = document.getElementById('status')
  el.dataset.status = state
  el.textContent = text
}

function setLocal (state, text) {
  const el = document.getElementById('local')
  el.dataset.state = state
  el.textContent = text
}

async function main () {
  const docName = params.get('doc') || 'demo'
  const relay = (await relayUrl()).replace(/\/+$/, '')
  const name = userName()
  const color = colorOf(name)

  document.title = `${docName} · crdtsync`
  document.getElementById('doc').textContent = docName
  document.getElementById('relay').textContent = relay
  document.getElementById('me').textContent = name
  document.getElementById('me').style.color = color

  const ydoc = new Y.Doc()
  const ytext = ydoc.getText('text') // a pycrdt replica reads doc.get("text", type=Text)

  // Local copy first: the page shows and edits it with no relay at all.
  const local = new IndexeddbPersistence(docName, ydoc)
  // Saved in this browser: each update is written by y-indexeddb in a transaction on the
  // "updates" store; a read transaction on that store opened after it completes after it.
  let unsaved = 0
  setLocal('loading', 'loading the copy in this browser…')
  local.on('synced', () => {
    unsaved = 0
    setLocal('saved', 'saved in this browser')
    document.body.dataset.localLoaded = 'true'
  })
  ydoc.on('update', (_update, origin) => {
    if (origin === local || !local.db) return
    unsaved++
    setLocal('saving', 'saving in this browser…')
    const done = () => {
      if (--unsaved === 0) setLocal('saved', 'saved in this browser')
    }
    const tx = local.db.transaction(['updates'], 'readonly')
    tx.oncomplete = done
    tx.onerror = tx.onabort = () => {
      unsaved = Math.max(0, unsaved - 1)
      setLocal('error', 'could not save in this browser')
    }
  })

  // The relay: stock y-websocket, document name = URL path (ws://relay/<doc>).
  const provider = new WebsocketProvider(relay, docName, ydoc)
  setStatus('connecting', 'connecting…')
  provider.on('status', ({ status }) => {
    if (status === 'connected') setStatus('online', provider.synced ? 'online' : 'online, syncing…')
    else if (status === 'disconnected') setStatus('offline', 'offline: edits stay here')
  })
  provider.on('sync', (synced) => {
    if (synced && provider.wsconnected) setStatus('online', 'online')
  })
  const offline = () => {
    if (!provider.wsconnected) setStatus('offline', 'offline: edits stay here')
  }
  provider.on('connection-close', offline)
  provider.on('connection-error', offline)

  // Presence: name and colour in everyone's cursors and in the list of who is here.
  const awareness = provider.awareness
  awareness.setLocalStateField('user', { name, color, colorLight: color + '33' })
  const peers = document.getElementById('peers')
  const renderPeers = () => {
    const items = []
    awareness.getStates().forEach((state, clientId) => {
      const user = state.user
      if (!user || !user.name) return
      const li = document.createElement('li')
      li.dataset.name = user.name
      li.dataset.client = String(clientId)
      const dot = document.createElement('span')
      dot.className = 'dot'
      dot.style.background = user.color || '#888'
      li.append(dot, document.createTextNode(user.name + (clientId === ydoc.clientID ? ' (you)' : '')))
      if (clientId === ydoc.clientID) li.className = 'self'
      items.push(li)
    })
    peers.replaceChildren(...items)
  }
  awareness.on('change', renderPeers)
  renderPeers()

  const undoManager = new Y.UndoManager(ytext)
  const view = new EditorView({
    parent: document.getElementById('editor'),
    extensions: [
      keymap.of(yUndoManagerKeymap),
      basicSetup,
      EditorView.lineWrapping,
      yCollab(ytext, awareness, { undoManager })
    ]
  })

  // For the curious (and the console): the live objects.
  window.crdtsyncDemo = { ydoc, ytext, provider, local, view, awareness }
}

main().catch((error) => {
  console.error(error)
  setStatus('error', `error: ${error.message}`)
})
