#!/usr/bin/env node
// A stock Yjs client (yjs 13.6 + y-websocket 3.x WebsocketProvider over `ws`) that a test
// scripts through JSON lines.
//
//   node yjs_client.mjs --url ws://127.0.0.1:PORT --room NAME [--params k=v ...]
//                       [--offline] [--resync-ms N] [--max-backoff-ms N]
//
// --offline creates the provider with connect:false, so edits can be made before the
// first {"cmd":"connect"}. --params become the provider's URL query (y-websocket encodes
// keys and values with encodeURIComponent; the room name is appended raw).
//
// Protocol: one JSON object per line on stdin, one JSON answer per line on stdout, in
// order. An answer is {"ok": true, ...} or {"ok": false, "error": "..."}; a command's
// "id" (any JSON value) is echoed back. On start the client prints one line
// {"event": "ready", "client_id": N, "url": "..."}. stdout carries nothing else: every
// library log goes to stderr, and console.error/console.warn output is also recorded for
// {"cmd": "errors"} (y-websocket reports an unknown message type with
// console.error('Unable to compute message') and a permission-denied auth message with
// console.warn). Exceptions that escape (a malformed message the provider does not guard,
// e.g. a truncated sync step 1) are recorded with level "uncaught" instead of killing the
// process; note that afterwards the `ws` socket delivers no further messages, although it
// still counts as connected. EOF on stdin or SIGTERM ends the process.
//
// Commands (indices of text ops count UTF-16 code units, Yjs's own unit, unless the edit
// command says "index_unit": "codepoint"):
//   connect | disconnect | status | errors | update_count | quit
//   wait_synced   {timeout_ms}                       provider.synced is true
//   wait_status   {connected?, synced?, timeout_ms}  provider.wsconnected/synced as given
//   edit          {ops, index_unit?}                 all ops in one doc.transact
//       ["text_insert", name, index, str]     ["text_delete", name, index, len]
//       ["map_set", name, key, json]          ["map_delete", name, key]
//       ["array_push", name, [values]]        ["array_insert", name, index, [values]]
//       ["array_delete", name, index, len]
//   state         {text?: [names], map?: [names], array?: [names]}
//                 without names: every root type this doc knows, by its type (a root
//                 only received from a peer is typed from its content; "untyped" lists
//                 the ones whose content cannot tell)
//   wait_text     {name, equals, timeout_ms}
//   wait_state    {text?|map?|array?: {name: expectedJSON}, timeout_ms}
//   state_vector                                     base64 Y.encodeStateVector(doc)
//   update        {state_vector?: base64}            base64 Y.encodeStateAsUpdate(doc, sv)
//   apply_update  {update: base64}                   applied as a local change (it is sent on)
//   wait_covers   {state_vector: base64, timeout_ms} doc has every clock in that vector
//   awareness_set {state} | awareness_states
//   apply_trace   {path, limit?, name?}              gzipped editing trace into Y.Text name
//                                                    ("text"), one transaction per trace txn

import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { gunzipSync } from 'node:zlib'
import { format } from 'node:util'

// ---------------------------------------------------------------------------------------
// Logging: stdout is the command channel. Record console.error/warn, echo all to stderr.
const recordedErrors = []
const MAX_RECORDED = 1000
const writeStderr = (line) => process.stderr.write(line + '\n')
const record = (level, args) => {
  const message = format(...args)
  if (recordedErrors.length < MAX_RECORDED) {
    recordedErrors.push({ level, message, time_ms: Date.now() })
  }
  writeStderr(`[${level}] ${message}`)
}
console.error = (...args) => record('error', args)
console.warn = (...args) => record('warn', args)
console.log = console.info = console.debug = (...args) => writeStderr(format(...args))

// A malformed message makes the provider's onmessage throw; under Node that surfaces as an
// uncaught exception. Record it (the test decides whether it matters) instead of dying.
process.on('uncaughtException', (err) => record('uncaught', [err && err.stack ? err.stack : err]))
process.on('unhandledRejection', (err) => record('unhandled', [err && err.stack ? err.stack : err]))

const { default: WebSocket } = await import('ws')
const Y = await import('yjs')
const { WebsocketProvider } = await import('y-websocket')

// y-websocket's resyncInterval timer tests `WebSocket.OPEN` on the global WebSocket, which
// Node 20 does not define (Node 22 does): give it the polyfill so --resync-ms works.
if (typeof globalThis.WebSocket === 'undefined') globalThis.WebSocket = WebSocket

// ---------------------------------------------------------------------------------------
const usage = 'usage: yjs_client.mjs --url ws://host:port --room NAME [--params k=v ...] ' +
  '[--offline] [--resync-ms N] [--max-backoff-ms N]'

const parseArgs = (argv) => {
  const opts = { url: null, room: null, params: {}, offline: false, resyncMs: -1, maxBackoffMs: 2500 }
  const intArg = (flag, value) => {
    const n = Number.parseInt(value, 10)
    if (!Number.isInteger(n)) throw new Error(`${flag} needs an integer, got ${JSON.stringify(value)}`)
    return n
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    const next = argv[i + 1]
    if (arg === '--url' && next !== undefined) {
      opts.url = next
      i++
    } else if (arg === '--room' && next !== undefined) {
      opts.room = next
      i++
    } else if (arg === '--params') {
      while (i + 1 < argv.length && !argv[i + 1].startsWith('--')) {
        const kv = argv[++i]
        const eq = kv.indexOf('=')
        if (eq <= 0) throw new Error(`--params takes k=v pairs, got ${JSON.stringify(kv)}`)
        opts.params[kv.slice(0, eq)] = kv.slice(eq + 1)
      }
    } else if (arg === '--offline') {
      opts.offline = true
    } else if (arg === '--resync-ms' && next !== undefined) {
      opts.resyncMs = intArg(arg, next)
      i++
    } else if (arg === '--max-backoff-ms' && next !== undefined) {
      opts.maxBackoffMs = intArg(arg, next)
      i++
    } else {
      throw new Error(`unknown argument ${JSON.stringify(arg)}; ${usage}`)
    }
  }
  if (opts.url === null || opts.room === null) throw new Error(usage)
  return opts
}

let opts
try {
  opts = parseArgs(process.argv.slice(2))
} catch (err) {
  writeStderr(String(err.message || err))
  process.exit(2)
}

const doc = new Y.Doc()
let updateCount = 0
doc.on('update', () => { updateCount++ })

const provider = new WebsocketProvider(opts.url, opts.room, doc, {
  connect: !opts.offline,
  params: opts.params,
  WebSocketPolyfill: WebSocket,
  resyncInterval: opts.resyncMs,
  maxBackoffTime: opts.maxBackoffMs,
  // One provider per process: cross-tab BroadcastChannel sync would only hide the network.
  disableBc: true
})

const closes = []
provider.on('connection-close', (event) => {
  // event is null when the provider closed the socket itself (disconnect(), 30 s watchdog)
  if (closes.length < MAX_RECORDED) {
    closes.push(event == null
      ? { local: true, time_ms: Date.now() }
      : { local: false, code: event.code, reason: String(event.reason ?? ''), time_ms: Date.now() })
  }
})
const connectionErrors = []
provider.on('connection-error', (event) => {
  if (connectionErrors.length < MAX_RECORDED) {
    connectionErrors.push({ message: String(event?.message ?? event?.error ?? event), time_ms: Date.now() })
  }
})

// ---------------------------------------------------------------------------------------
const b64 = (bytes) => Buffer.from(bytes).toString('base64')
const unb64 = (text) => {
  if (typeof text !== 'string') throw new Error('expected a base64 string')
  return new Uint8Array(Buffer.from(text, 'base64'))
}

const requireInt = (value, what) => {
  if (!Number.isInteger(value) || value < 0) throw new Error(`${what} must be a non-negative integer, got ${JSON.stringify(value)}`)
  return value
}
const requireString = (value, what) => {
  if (typeof value !== 'string') throw new Error(`${what} must be a string, got ${JSON.stringify(value)}`)
  return value
}
const requireArray = (value, what) => {
  if (!Array.isArray(value)) throw new Error(`${what} must be an array, got ${JSON.stringify(value)}`)
  return value
}

// Code-point index -> UTF-16 index in the current content of `text`.
const utf16Index = (str, codepoints) => {
  let units = 0
  let seen = 0
  while (seen < codepoints && units < str.length) {
    const c = str.charCodeAt(units)
    units += (c >= 0xd800 && c <= 0xdbff && units + 1 < str.length) ? 2 : 1
    seen++
  }
  if (seen < codepoints) throw new Error(`index ${codepoints} is past the end (${seen} code points)`)
  return units
}

const applyOp = (op, indexUnit) => {
  requireArray(op, 'op')
  const [kind, name] = op
  requireString(name, `${kind}: root type name`)
  const toUnits = (text, index, length) => {
    if (indexUnit !== 'codepoint') return [index, length]
    const str = text.toString()
    const start = utf16Index(str, index)
    return [start, length === undefined ? undefined : utf16Index(str.slice(start), length)]
  }
  switch (kind) {
    case 'text_insert': {
      const text = doc.getText(name)
      const [index] = toUnits(text, requireInt(op[2], 'text_insert index'))
      if (index > text.length) throw new Error(`text_insert at ${index} past the end of '${name}' (${text.length})`)
      text.insert(index, requireString(op[3], 'text_insert string'))
      break
    }
    case 'text_delete': {
      const text = doc.getText(name)
      const [index, length] = toUnits(text, requireInt(op[2], 'text_delete index'), requireInt(op[3], 'text_delete length'))
      if (index + length > text.length) throw new Error(`text_delete ${index}+${length} past the end of '${name}' (${text.length})`)
      text.delete(index, length)
      break
    }
    case 'map_set':
      doc.getMap(name).set(requireString(op[2], 'map_set key'), op[3])
      break
    case 'map_delete':
      doc.getMap(name).delete(requireString(op[2], 'map_delete key'))
      break
    case 'array_push':
      doc.getArray(name).push(requireArray(op[2], 'array_push values'))
      break
    case 'array_insert': {
      const array = doc.getArray(name)
      const index = requireInt(op[2], 'array_insert index')
      if (index > array.length) throw new Error(`array_insert at ${index} past the end of '${name}' (${array.length})`)
      array.insert(index, requireArray(op[3], 'array_insert values'))
      break
    }
    case 'array_delete': {
      const array = doc.getArray(name)
      const index = requireInt(op[2], 'array_delete index')
      const length = requireInt(op[3], 'array_delete length')
      if (index + length > array.length) throw new Error(`array_delete ${index}+${length} past the end of '${name}' (${array.length})`)
      array.delete(index, length)
      break
    }
    default:
      throw new Error(`unknown op ${JSON.stringify(kind)}`)
  }
}

// A root type that only arrived in a peer's update is a placeholder until an app asks for
// it by type; guess the type from its content, or undefined if its content cannot tell
// (e.g. everything deleted).
const inferRootKind = (type) => {
  for (let item = type._start; item !== null; item = item.right) {
    if (item.deleted) continue
    const content = item.content
    if (content instanceof Y.ContentString || content instanceof Y.ContentFormat || content instanceof Y.ContentEmbed) return 'text'
    return 'array'
  }
  for (const item of type._map.values()) {
    if (!item.deleted) return 'map'
  }
  return undefined
}

const rootState = ({ text, map, array }) => {
  const out = { text: {}, map: {}, array: {} }
  if (text === undefined && map === undefined && array === undefined) {
    // Every root this doc knows. A root type only received from a peer stays an untyped
    // placeholder until someone asks for it by type: those are listed under "untyped".
    out.untyped = []
    for (const [name, type] of doc.share) {
      const kind = type instanceof Y.Text ? 'text'
        : type instanceof Y.Map ? 'map'
          : type instanceof Y.Array ? 'array'
            : inferRootKind(type)
      if (kind === 'text') out.text[name] = doc.getText(name).toString()
      else if (kind === 'map') out.map[name] = doc.getMap(name).toJSON()
      else if (kind === 'array') out.array[name] = doc.getArray(name).toJSON()
      else out.untyped.push(name)
    }
    return out
  }
  for (const name of requireArray(text ?? [], 'text')) out.text[name] = doc.getText(name).toString()
  for (const name of requireArray(map ?? [], 'map')) out.map[name] = doc.getMap(name).toJSON()
  for (const name of requireArray(array ?? [], 'array')) out.array[name] = doc.getArray(name).toJSON()
  return out
}

const jsonEqual = (a, b) => JSON.stringify(canonical(a)) === JSON.stringify(canonical(b))
const canonical = (value) => {
  if (Array.isArray(value)) return value.map(canonical)
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]))
  }
  return value
}

const covers = (stateVector) => {
  const mine = Y.decodeStateVector(Y.encodeStateVector(doc))
  for (const [client, clock] of Y.decodeStateVector(stateVector)) {
    if ((mine.get(client) ?? 0) < clock) return false
  }
  return true
}

// Wait until check() returns a non-undefined value; re-check once per event-loop turn in
// which the document changed or the provider reported, and every 20 ms. A check may cost
// O(document) (toString), so never run it once per update: a trace brings 100,000s.
// Bounded by timeout_ms; a timeout reports what it last saw.
const waitFor = (timeoutMs, check, describe) => new Promise((resolve) => {
  requireInt(timeoutMs, 'timeout_ms')
  let done = false
  let scheduled = false
  let timer = null
  let poll = null
  const finish = (answer) => {
    if (done) return
    done = true
    clearTimeout(timer)
    clearInterval(poll)
    doc.off('update', schedule)
    provider.off('sync', schedule)
    provider.off('status', schedule)
    resolve(answer)
  }
  const attempt = () => {
    scheduled = false
    if (done) return
    try {
      const result = check()
      if (result !== undefined) finish({ ok: true, ...result })
    } catch (err) {
      finish({ ok: false, error: String(err.message || err) })
    }
  }
  const schedule = () => {
    if (scheduled || done) return
    scheduled = true
    setImmediate(attempt)
  }
  doc.on('update', schedule)
  provider.on('sync', schedule)
  provider.on('status', schedule)
  poll = setInterval(attempt, 20)
  timer = setTimeout(() => finish({ ok: false, error: `timed out after ${timeoutMs} ms: ${describe()}` }), timeoutMs)
  attempt()
})

const status = () => ({
  client_id: doc.clientID,
  url: provider.url,
  connected: provider.wsconnected,
  connecting: provider.wsconnecting,
  synced: provider.synced,
  should_connect: provider.shouldConnect,
  unsuccessful_reconnects: provider.wsUnsuccessfulReconnects,
  update_count: updateCount,
  closes,
  connection_errors: connectionErrors
})

const yieldToLoop = () => new Promise((resolve) => setImmediate(resolve))

const applyTrace = async ({ path, limit, name = 'text' }) => {
  const trace = JSON.parse(gunzipSync(readFileSync(requireString(path, 'path'))).toString('utf8'))
  const txns = requireArray(trace.txns, 'trace txns')
  const count = limit === undefined || limit === null ? txns.length : Math.min(requireInt(limit, 'limit'), txns.length)
  const text = doc.getText(requireString(name, 'name'))
  // Trace positions count code points and Yjs counts UTF-16 units. They agree unless an
  // inserted string holds a code point above U+FFFF; only then pay for converting.
  const astral = /[\ud800-\udfff]/
  const needsConversion = txns.slice(0, count).some((t) => t.patches.some((p) => astral.test(p[2])))
  for (let i = 0; i < count; i++) {
    doc.transact(() => {
      for (const [pos, del, ins] of txns[i].patches) {
        let at = pos
        let len = del
        if (needsConversion) {
          const str = text.toString()
          at = utf16Index(str, pos)
          len = utf16Index(str.slice(at), del)
        }
        if (len > 0) text.delete(at, len)
        if (ins.length > 0) text.insert(at, ins)
      }
    })
    // let the socket drain now and then instead of queueing the whole trace in memory
    if (i % 1000 === 999) await yieldToLoop()
  }
  const answer = { applied: count, total: txns.length, length: text.length }
  if (count === txns.length && typeof trace.endContent === 'string') {
    answer.matches_end = text.toString() === trace.endContent
  }
  return answer
}

// ---------------------------------------------------------------------------------------
const handlers = {
  connect: () => {
    provider.connect()
    return status()
  },
  disconnect: () => {
    provider.disconnect()
    return status()
  },
  status: () => status(),
  errors: () => ({ errors: recordedErrors, closes, connection_errors: connectionErrors }),
  update_count: () => ({ update_count: updateCount }),
  wait_synced: ({ timeout_ms: timeoutMs }) =>
    waitFor(timeoutMs, () => (provider.synced ? status() : undefined),
      () => `synced=${provider.synced} connected=${provider.wsconnected} url=${provider.url}`),
  edit: ({ ops, index_unit: indexUnit = 'utf16' }) => {
    requireArray(ops, 'ops')
    if (indexUnit !== 'utf16' && indexUnit !== 'codepoint') throw new Error(`index_unit must be "utf16" or "codepoint", got ${JSON.stringify(indexUnit)}`)
    let failure = null
    // Yjs cannot roll back a transaction: an op that fails part-way leaves the ops before
    // it applied. Validation above keeps that to programming errors in the test.
    doc.transact(() => {
      for (const op of ops) {
        try {
          applyOp(op, indexUnit)
        } catch (err) {
          failure = err
          return
        }
      }
    })
    if (failure !== null) throw failure
    return { applied: ops.length }
  },
  wait_status: ({ connected, synced, timeout_ms: timeoutMs }) => {
    for (const [key, value] of [['connected', connected], ['synced', synced]]) {
      if (value !== undefined && typeof value !== 'boolean') throw new Error(`${key} must be true or false`)
    }
    return waitFor(timeoutMs, () => {
      const now = status()
      const match = (connected === undefined || now.connected === connected) &&
        (synced === undefined || now.synced === synced)
      return match ? now : undefined
    }, () => `connected=${provider.wsconnected} synced=${provider.synced}`)
  },
  state: (cmd) => rootState(cmd),
  wait_text: ({ name, equals, timeout_ms: timeoutMs }) => {
    requireString(name, 'name')
    requireString(equals, 'equals')
    const text = doc.getText(name)
    return waitFor(timeoutMs, () => (text.toString() === equals ? { text: equals } : undefined),
      () => `text '${name}' is ${JSON.stringify(text.toString().slice(0, 500))}`)
  },
  wait_state: ({ text = {}, map = {}, array = {}, timeout_ms: timeoutMs }) => {
    const query = { text: Object.keys(text), map: Object.keys(map), array: Object.keys(array) }
    const expected = { text, map, array }
    let last = null
    return waitFor(timeoutMs, () => {
      last = rootState(query)
      return jsonEqual(last, expected) ? last : undefined
    }, () => `state is ${JSON.stringify(last).slice(0, 1000)}`)
  },
  state_vector: () => ({ state_vector: b64(Y.encodeStateVector(doc)) }),
  update: ({ state_vector: sv }) =>
    ({ update: b64(sv === undefined ? Y.encodeStateAsUpdate(doc) : Y.encodeStateAsUpdate(doc, unb64(sv))) }),
  apply_update: ({ update }) => {
    Y.applyUpdate(doc, unb64(update), 'apply_update')
    return { update_count: updateCount }
  },
  wait_covers: ({ state_vector: sv, timeout_ms: timeoutMs }) => {
    const target = unb64(sv)
    return waitFor(timeoutMs, () => (covers(target) ? { state_vector: b64(Y.encodeStateVector(doc)) } : undefined),
      () => `state vector is ${JSON.stringify([...Y.decodeStateVector(Y.encodeStateVector(doc))])}, ` +
        `wanted ${JSON.stringify([...Y.decodeStateVector(target)])}`)
  },
  awareness_set: ({ state }) => {
    provider.awareness.setLocalState(state === undefined ? null : state)
    return { client_id: doc.clientID }
  },
  awareness_states: () => ({
    client_id: doc.clientID,
    states: Object.fromEntries([...provider.awareness.getStates()].map(([id, s]) => [String(id), s]))
  }),
  apply_trace: (cmd) => applyTrace(cmd)
}

const send = (answer) => new Promise((resolve) => {
  let line
  try {
    line = JSON.stringify(answer)
  } catch (err) {
    line = JSON.stringify({ ok: false, id: answer.id, error: `answer is not JSON: ${err.message}` })
  }
  process.stdout.write(line + '\n', resolve)
})

let quitting = false
const quit = async (code) => {
  if (quitting) return // a SIGTERM during quit: the first quit exits soon enough
  quitting = true
  const ws = provider.ws
  try {
    provider.destroy()
  } catch (err) {
    record('error', [err])
  }
  // let the close frame go out, so the server sees a clean close; bounded
  if (ws !== null && ws.readyState !== WebSocket.CLOSED) {
    await new Promise((resolve) => {
      ws.once('close', resolve)
      setTimeout(resolve, 500)
    })
  }
  process.exit(code)
}

process.on('SIGTERM', () => quit(0))
process.on('SIGINT', () => quit(0))

const run = async () => {
  await send({ event: 'ready', client_id: doc.clientID, url: provider.url })
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
  for await (const line of lines) {
    if (line.trim() === '') continue
    let cmd
    try {
      cmd = JSON.parse(line)
      if (cmd === null || typeof cmd !== 'object' || Array.isArray(cmd)) throw new Error('a command is a JSON object')
    } catch (err) {
      await send({ ok: false, error: `bad command line: ${err.message}` })
      continue
    }
    const id = cmd.id
    if (cmd.cmd === 'quit') {
      await send({ ok: true, id })
      await quit(0)
    }
    const handler = Object.hasOwn(handlers, cmd.cmd) ? handlers[cmd.cmd] : undefined
    let answer
    if (handler === undefined) {
      answer = { ok: false, error: `unknown cmd ${JSON.stringify(cmd.cmd)}` }
    } else {
      try {
        const result = await handler(cmd)
        answer = 'ok' in result ? result : { ok: true, ...result }
      } catch (err) {
        answer = { ok: false, error: String(err.message || err) }
      }
    }
    await send({ ...answer, id })
  }
  // stdin closed: the driving test is gone
  await quit(0)
}

run()
