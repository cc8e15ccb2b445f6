#!/usr/bin/env node
// The one client driver of the benchmark suite: the same code runs against every server.
//
//   node driver.mjs trace  --url ws://127.0.0.1:PORT --trace FILE.json.gz [--chunk 1000] [--timeout-s 120] [--reader-url URL]
//   node driver.mjs fanout --url URL[,URL...] [--readers 50] [--updates 2000] [--rate 0] [--reader-mode raw|apply]
//                          [--framing y-websocket|hocuspocus] [--timeout-s 60]
//   node driver.mjs docs   --url URL [--docs 1000] [--prefix NAME] [--timeout-s 120]
//
// Clients are "stock" y-websocket clients written on the raw protocol (Yjs 13.6 documents,
// y-protocols encoding, ws 8, no compression): on open each sends its sync step 1, answers
// the server's step 1 with step 2, and applies every sync update it receives. They never
// use a protocol extension, so crdtsync's relay treats them exactly like browser clients.
// All clients of a run live in this one process and share one clock (performance.now()).
//
// fanout --url may list several servers (comma-separated) that share documents (relays on
// one store, Hocuspocus instances on one Redis): the writer connects to the first, reader
// i to URL[i % n]. --framing hocuspocus speaks Hocuspocus 3's framing instead (below).
//
// Output: JSON lines on stdout; the last one is {"event": "result", ...}. Every wait is
// bounded by --timeout-s; on timeout the result says finished: false with the progress.

import { readFileSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import { gunzipSync } from 'node:zlib'
import { WebSocket } from 'ws'
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'

const MSG_SYNC = 0
const MSG_AWARENESS = 1
const MSG_AUTH = 2
const MSG_QUERY_AWARENESS = 3

// Hocuspocus 3 (@hocuspocus/server src/types.ts MessageType, @hocuspocus/common auth.ts
// AuthMessageType): every message, both ways, starts with the document name as a lib0
// varString and holds one message per websocket frame; a connection's sync messages are
// handled only after its Auth message (type 2, subtype Token 0, a token string; with no
// onAuthenticate hook any token is accepted). The server answers Auth with subtype
// Authenticated (2) + scope, or PermissionDenied (1) + reason; it may send SyncReply (4,
// read as Sync) and acknowledges each applied update with SyncStatus (8, varUint 0/1).
const HP_SYNC_REPLY = 4
const HP_AUTH_TOKEN = 0
const HP_AUTH_PERMISSION_DENIED = 1
const HP_AUTH_AUTHENTICATED = 2
const FRAMINGS = ['y-websocket', 'hocuspocus']

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const now = () => performance.now()
const tick = () => new Promise((resolve) => setImmediate(resolve))
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const parseArgs = (argv) => {
  const opts = {}
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}`)
    }
    opts[argv[i].slice(2)] = argv[i + 1]
  }
  return opts
}

/** A sync-update frame ([0, 2, update]) as every y-websocket peer sends it. */
const updateFrame = (update) => {
  const encoder = encoding.createEncoder()
  encoding.writeVarUint(encoder, MSG_SYNC)
  syncProtocol.writeUpdate(encoder, update)
  return encoding.toUint8Array(encoder)
}

/** Resolve when `predicate()` holds (checked on `poke()` and every 50 ms) or reject at `deadline`. */
class Waiter {
  constructor () { this.waits = [] }
  until (predicate, deadline, what) {
    if (predicate()) return Promise.resolve()
    return new Promise((resolve, reject) => {
      const w = { predicate, resolve, reject, what }
      w.timer = setInterval(() => this.check(w), 50)
      w.deadline = setTimeout(() => {
        this.drop(w)
        reject(new Error(`timed out waiting for ${what}`))
      }, Math.max(0, deadline - now()))
      this.waits.push(w)
    })
  }

  check (w) {
    if (w.predicate()) {
      this.drop(w)
      w.resolve()
    }
  }

  drop (w) {
    clearInterval(w.timer)
    clearTimeout(w.deadline)
    this.waits = this.waits.filter((x) => x !== w)
  }

  poke () { for (const w of [...this.waits]) this.check(w) }
}

/**
 * One websocket client on one room. Until synced it is a full Yjs client. After that,
 * `mode` says what it does with each sync update: 'apply' applies it to its Y.Doc (a
 * stock client), 'raw' only hands the update bytes to `onRawUpdate` without applying
 * (the trace writer counts its own echoes that way, and the light fan-out readers decode
 * the update to read its timestamp), so the shared driver process spends as little CPU
 * per message as possible and the server is what is measured.
 */
class Peer {
  constructor (url, room, { doc = new Y.Doc(), mode = 'apply', onUpdate = null, onRawUpdate = null, framing = 'y-websocket' } = {}) {
    if (!FRAMINGS.includes(framing)) throw new Error(`--framing ${FRAMINGS.join('|')}, not ${framing}`)
    this.url = `${url}/${room}`
    this.room = room
    this.framing = framing // 'hocuspocus': every message prefixed with the room name (see above)
    this.authenticated = false // hocuspocus: the server answered our Auth with Authenticated
    this.doc = doc
    this.mode = mode
    this.onUpdate = onUpdate // after each applied sync update ('apply' mode)
    this.onRawUpdate = onRawUpdate // with each update's bytes ('raw' mode)
    this.synced = false
    this.updates = 0
    this.closed = false
    this.error = null
  }

  open (waiter, deadline) {
    this.waiter = waiter
    this.ws = new WebSocket(this.url, { perMessageDeflate: false })
    this.ws.binaryType = 'nodebuffer'
    this.ws.on('open', () => {
      // Hocuspocus: Auth first (an empty token), then step 1, as HocuspocusProvider does
      if (this.framing === 'hocuspocus') this.sendAuth()
      const encoder = this.encoder()
      encoding.writeVarUint(encoder, MSG_SYNC)
      syncProtocol.writeSyncStep1(encoder, this.doc)
      this.ws.send(encoding.toUint8Array(encoder))
    })
    this.ws.on('message', (data) => this.receive(data))
    this.ws.on('error', (err) => { this.error = String(err) })
    this.ws.on('close', (code, reason) => {
      this.closed = true
      this.closeInfo = `${code} ${reason}`
      waiter.poke()
    })
    return waiter.until(() => this.synced || this.closed, deadline, `sync of ${this.url}`)
      .then(() => { if (!this.synced) throw new Error(`${this.url} closed before sync: ${this.closeInfo} ${this.error ?? ''}`) })
  }

  /** An encoder for one outgoing message: empty, or (Hocuspocus) holding the room name. */
  encoder () {
    const encoder = encoding.createEncoder()
    if (this.framing === 'hocuspocus') encoding.writeVarString(encoder, this.room)
    return encoder
  }

  sendAuth () {
    const encoder = this.encoder()
    encoding.writeVarUint(encoder, MSG_AUTH)
    encoding.writeVarUint(encoder, HP_AUTH_TOKEN)
    encoding.writeVarString(encoder, '')
    this.ws.send(encoding.toUint8Array(encoder))
  }

  /** One sync message (after its type): answer it, count it; the decoder is left after it. */
  receiveSync (decoder) {
    if (this.synced && this.mode === 'raw') {
      const pos = decoder.pos
      if (decoding.readVarUint(decoder) === syncProtocol.messageYjsUpdate) {
        const update = decoding.readVarUint8Array(decoder)
        this.updates++
        if (this.onRawUpdate) this.onRawUpdate(update, this)
        this.waiter.poke()
        return
      }
      decoder.pos = pos
    }
    const encoder = this.encoder()
    encoding.writeVarUint(encoder, MSG_SYNC)
    const head = encoding.length(encoder)
    const kind = syncProtocol.readSyncMessage(decoder, encoder, this.doc, this)
    if (encoding.length(encoder) > head) this.ws.send(encoding.toUint8Array(encoder))
    if (kind === syncProtocol.messageYjsSyncStep2 && !this.synced) {
      this.synced = true
    } else if (kind === syncProtocol.messageYjsUpdate) {
      this.updates++
      if (this.onUpdate) this.onUpdate(this)
    }
    this.waiter.poke()
  }

  receive (data) {
    const decoder = decoding.createDecoder(data)
    if (this.framing === 'hocuspocus') {
      this.receiveHocuspocus(decoder)
      return
    }
    while (decoding.hasContent(decoder)) {
      const type = decoding.readVarUint(decoder)
      if (type === MSG_SYNC) {
        this.receiveSync(decoder)
      } else if (type === MSG_AWARENESS) {
        decoding.readVarUint8Array(decoder) // presence: not part of these benchmarks
      } else if (type === MSG_AUTH) {
        decoding.readVarUint(decoder)
        this.error = `permission denied: ${decoding.readVarString(decoder)}`
        return
      } else if (type === MSG_QUERY_AWARENESS) {
        // nothing to report
      } else {
        return // unknown type: a stock client ignores the rest of the frame
      }
    }
  }

  /** One Hocuspocus frame: the room name, then one message. */
  receiveHocuspocus (decoder) {
    if (decoding.readVarString(decoder) !== this.room) return // another document: not ours
    const type = decoding.readVarUint(decoder)
    if (type === MSG_SYNC || type === HP_SYNC_REPLY) {
      this.receiveSync(decoder)
    } else if (type === MSG_AUTH) {
      const sub = decoding.readVarUint(decoder)
      if (sub === HP_AUTH_AUTHENTICATED) {
        this.authenticated = true
      } else if (sub === HP_AUTH_PERMISSION_DENIED) {
        this.error = `permission denied: ${decoding.readVarString(decoder)}`
        this.ws.close() // open() then fails with this error
      } else if (sub === HP_AUTH_TOKEN) {
        this.sendAuth() // the server asks for the token again
      }
    }
    // awareness (1), query awareness (3), stateless (5, 6), close (7), sync status (8):
    // not part of these benchmarks
  }

  send (frame) { this.ws.send(frame) }

  /** A sync-update message carrying `update`, in this peer's framing. */
  sendUpdate (update) {
    if (this.framing !== 'hocuspocus') {
      this.ws.send(updateFrame(update))
      return
    }
    const encoder = this.encoder()
    encoding.writeVarUint(encoder, MSG_SYNC)
    syncProtocol.writeUpdate(encoder, update)
    this.ws.send(encoding.toUint8Array(encoder))
  }

  close (deadline) {
    if (this.closed) return Promise.resolve()
    this.ws.close()
    return this.waiter.until(() => this.closed, deadline, `close of ${this.url}`)
      .catch(() => { this.ws.terminate() })
  }
}

const randomRoom = (prefix) => `${prefix}-${process.pid}-${Math.floor(Math.random() * 1e9)}`

// -- trace: one writer, one reader, every txn of an editing trace ------------------------

const loadTrace = (path) => JSON.parse(gunzipSync(readFileSync(path)).toString('utf8'))

async function trace (opts) {
  const timeoutMs = Number(opts['timeout-s'] ?? 120) * 1000
  const chunk = Number(opts.chunk ?? 1000)
  const data = loadTrace(opts.trace)
  const endContent = data.endContent

  // The writer's updates are produced up front by a local Y.Doc (one per trace txn, taken
  // from its 'update' event), so the timed part is sending, relaying and applying only.
  let t = now()
  const src = new Y.Doc()
  const srcText = src.getText('text')
  const frames = []
  src.on('update', (update) => frames.push(updateFrame(update)))
  for (const txn of data.txns) {
    src.transact(() => {
      for (const [pos, del, ins] of txn.patches) {
        if (del > 0) srcText.delete(pos, del)
        if (ins) srcText.insert(pos, ins)
      }
    })
  }
  const generateMs = now() - t
  if (srcText.toString() !== endContent) throw new Error('local Yjs replay does not give endContent')
  const finalClock = Y.getState(src.store, src.clientID)
  const bytes = frames.reduce((n, f) => n + f.length, 0)

  // The reader's floor: applying the same frames to a Y.Doc with no network.
  t = now()
  const floorDoc = new Y.Doc()
  const sink = encoding.createEncoder()
  for (const f of frames) {
    const decoder = decoding.createDecoder(f)
    decoding.readVarUint(decoder)
    syncProtocol.readSyncMessage(decoder, sink, floorDoc, null)
  }
  const localApplyMs = now() - t
  if (floorDoc.getText('text').toString() !== endContent) throw new Error('local apply differs')
  floorDoc.destroy()

  const deadline = now() + timeoutMs
  const waiter = new Waiter()
  const room = randomRoom('trace')
  // --reader-url: the reader on another server of the same deployment (relays on one Redis)
  const reader = new Peer(opts['reader-url'] ?? opts.url, room)
  const rtext = reader.doc.getText('text')
  const endLength = endContent.length
  let doneAt = null
  reader.onUpdate = () => {
    if (doneAt === null && rtext.length === endLength &&
        Y.getState(reader.doc.store, src.clientID) >= finalClock &&
        rtext.toString() === endContent) {
      doneAt = now()
      waiter.poke()
    }
  }
  const writer = new Peer(opts.url, room, { mode: 'raw' })
  await reader.open(waiter, deadline)
  await writer.open(waiter, deadline)

  const t0 = now()
  let sent = 0
  for (let i = 0; i < frames.length; i += chunk) {
    const end = Math.min(i + chunk, frames.length)
    for (let j = i; j < end; j++) writer.send(frames[j])
    sent = end
    await tick() // let the reader (same process) read between chunks
    if (now() > deadline || reader.closed || writer.closed) break
  }
  const sendMs = now() - t0
  let finished = true
  let error = null
  try {
    await waiter.until(() => doneAt !== null || reader.closed, deadline, 'the reader to hold endContent')
    if (doneAt === null) throw new Error(`reader closed: ${reader.closeInfo}`)
  } catch (err) {
    finished = false
    error = String(err.message ?? err)
  }
  const result = {
    event: 'result',
    scenario: 'trace',
    finished,
    error,
    txns: data.txns.length,
    updates_sent: sent,
    update_bytes: bytes,
    generate_ms: generateMs,
    local_apply_ms: localApplyMs,
    send_ms: sendMs,
    end_to_end_ms: doneAt === null ? null : doneAt - t0,
    elapsed_ms: now() - t0,
    reader_updates: reader.updates,
    reader_length: rtext.length,
    writer_echoes: writer.updates,
    reader_close: reader.closed ? reader.closeInfo : null,
    writer_close: writer.closed ? writer.closeInfo : null
  }
  const closeBy = now() + 5000
  await Promise.all([reader.close(closeBy), writer.close(closeBy)])
  return result
}

// -- fanout: one writer, N readers, small updates carrying their send time -----------------

const quantile = (sorted, q) => sorted.length
  ? sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]
  : null

async function fanout (opts) {
  const timeoutMs = Number(opts['timeout-s'] ?? 60) * 1000
  const nReaders = Number(opts.readers ?? 50)
  const nUpdates = Number(opts.updates ?? 2000)
  const rate = Number(opts.rate ?? 0) // updates/s; 0 = as fast as possible
  const burst = Number(opts.burst ?? 50) // updates sent per event-loop turn at full speed
  const readerMode = opts['reader-mode'] ?? 'raw' // 'raw' (decode only) or 'apply' (Y.Doc)
  if (!['raw', 'apply'].includes(readerMode)) throw new Error(`--reader-mode raw|apply, not ${readerMode}`)
  const framing = opts.framing ?? 'y-websocket'
  if (!FRAMINGS.includes(framing)) throw new Error(`--framing ${FRAMINGS.join('|')}, not ${framing}`)
  // servers sharing the room: the writer on the first, reader i on urls[i % n]
  const urls = String(opts.url).split(',').filter((u) => u.length > 0)
  if (urls.length === 0) throw new Error('--url is empty')
  const deadline = now() + timeoutMs
  const waiter = new Waiter()
  const room = randomRoom('fanout')

  const latencies = []
  const byServer = urls.map(() => []) // several servers: latencies of each one's readers
  let firstSend = null
  let lastReceipt = 0
  let delivered = 0
  const record = (str, at, server = 0) => {
    for (const item of str.split(';')) {
      const sep = item.indexOf('@')
      if (sep < 0) continue
      const latency = at - Number(item.slice(sep + 1))
      latencies.push(latency)
      if (urls.length > 1) byServer[server].push(latency)
      delivered++
    }
    lastReceipt = at
  }
  const readers = []
  for (let i = 0; i < nReaders; i++) {
    let peer
    const server = i % urls.length
    if (readerMode === 'apply') {
      // stock readers: apply each update to a Y.Doc; receipt = when its text observer runs
      peer = new Peer(urls[server], room, { framing })
      peer.doc.getText('t').observe((event) => {
        const at = now()
        for (const d of event.delta) if (typeof d.insert === 'string') record(d.insert, at, server)
      })
    } else {
      // light readers: decode each update (Y.decodeUpdate) and read the inserted string
      peer = new Peer(urls[server], room, {
        mode: 'raw',
        framing,
        onRawUpdate: (update) => {
          const at = now()
          for (const struct of Y.decodeUpdate(update).structs) {
            if (struct.content && typeof struct.content.str === 'string') record(struct.content.str, at, server)
          }
        }
      })
    }
    readers.push(peer)
  }
  // The first reader creates the room alone: pycrdt-websocket 0.16.5 never answers the
  // other connections when several race to create a room. Then 10 at a time, then the writer.
  await readers[0].open(waiter, deadline)
  for (let i = 1; i < readers.length; i += 10) {
    await Promise.all(readers.slice(i, i + 10).map((r) => r.open(waiter, deadline)))
  }
  const writer = new Peer(urls[0], room, { mode: 'raw', framing })
  await writer.open(waiter, deadline)
  const wtext = writer.doc.getText('t')
  writer.doc.on('update', (update) => writer.sendUpdate(update))
  // wait for the initial step 2 answers to settle before timing
  await sleep(200)

  const expected = nReaders * nUpdates
  const t0 = now()
  firstSend = t0
  for (let seq = 0; seq < nUpdates; seq++) {
    if (rate > 0) {
      const due = t0 + (seq * 1000) / rate
      const wait = due - now()
      if (wait > 1) await sleep(wait)
      else if (wait > 0) await tick()
    } else if (seq % burst === 0 && seq > 0) {
      await tick()
    }
    wtext.insert(wtext.length, `${seq}@${now().toFixed(3)};`)
    if (now() > deadline) break
  }
  const sendMs = now() - t0
  let finished = true
  let error = null
  try {
    await waiter.until(() => delivered >= expected, deadline, `${expected} deliveries`)
  } catch (err) {
    finished = false
    error = String(err.message ?? err)
  }
  latencies.sort((a, b) => a - b)
  const spanMs = lastReceipt - firstSend
  const closed = readers.filter((r) => r.closed).length
  const result = {
    event: 'result',
    scenario: 'fanout',
    finished,
    error,
    readers: nReaders,
    reader_mode: readerMode,
    updates: nUpdates,
    rate,
    expected,
    delivered,
    send_ms: sendMs,
    span_ms: spanMs,
    delivered_per_s: spanMs > 0 ? (delivered * 1000) / spanMs : null,
    latency_ms: {
      p50: quantile(latencies, 0.5),
      p90: quantile(latencies, 0.9),
      p99: quantile(latencies, 0.99),
      max: latencies.length ? latencies[latencies.length - 1] : null
    },
    readers_closed_early: closed,
    writer_echoes: writer.updates
  }
  if (urls.length > 1) {
    // per server (in --url order; the writer is on the first): its readers' deliveries
    result.by_server = byServer.map((l) => {
      l.sort((a, b) => a - b)
      return {
        delivered: l.length,
        p50: quantile(l, 0.5),
        p99: quantile(l, 0.99),
        max: l.length ? l[l.length - 1] : null
      }
    })
  }
  const closeBy = now() + 10000
  await Promise.all([writer, ...readers].map((p) => p.close(closeBy)))
  return result
}

// -- docs: N documents one after another (connect, sync, one small update, disconnect) -----

async function docs (opts) {
  const timeoutMs = Number(opts['timeout-s'] ?? 120) * 1000
  const n = Number(opts.docs ?? 1000)
  const prefix = opts.prefix ?? randomRoom('mem')
  const deadline = now() + timeoutMs
  const waiter = new Waiter()
  let done = 0
  let noEcho = 0
  const t0 = now()
  for (let i = 0; i < n && now() < deadline; i++) {
    const peer = new Peer(opts.url, `${prefix}/doc-${i}`)
    await peer.open(waiter, deadline)
    const before = peer.updates
    peer.doc.on('update', (update, origin) => { if (origin !== peer) peer.send(updateFrame(update)) })
    peer.doc.getText('text').insert(0, `document ${i} written by the memory benchmark`)
    // every server here echoes an update to its sender too; wait for that echo so the
    // server has handled the update before we leave
    try {
      await waiter.until(() => peer.updates > before || peer.closed, Math.min(deadline, now() + 10000), 'echo')
    } catch {}
    if (peer.updates <= before) noEcho++
    await peer.close(Math.min(deadline, now() + 10000))
    done++
    if (done % 250 === 0) emit({ event: 'progress', docs: done, ms: now() - t0 })
  }
  return {
    event: 'result', scenario: 'docs', finished: done === n, docs: done, no_echo: noEcho, ms: now() - t0
  }
}

const commands = { trace, fanout, docs }
const [command, ...rest] = process.argv.slice(2)
if (!commands[command]) {
  console.error(`usage: driver.mjs ${Object.keys(commands).join('|')} --url URL ...`)
  process.exit(2)
}
const opts = parseArgs(rest)
emit({ event: 'versions', node: process.version })
commands[command](opts).then((result) => {
  emit(result)
  process.exit(0)
}, (err) => {
  emit({ event: 'result', scenario: command, finished: false, error: String(err.stack ?? err) })
  process.exit(1)
})
