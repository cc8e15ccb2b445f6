#!/usr/bin/env node
// The reference y-websocket server for the benchmarks: @y/websocket-server 0.1.1 (yjs 13.6,
// ws 8), memory only, exactly as the package's own bin sets it up (setupWSConnection on a
// ws WebSocketServer behind a plain http server).
//
//   node reference_server.mjs [--host 127.0.0.1] [--port 0] [--load-dir DIR]
//
// --load-dir DIR (bench/coldstart.py's stored document; off by default): a persistence
// set with the package's setPersistence() whose bindState reads DIR/<encodeURIComponent(name)>.bin
// (one Yjs update) synchronously when a document is first opened, so the first answer
// already holds it; writeState writes nothing. The package's own persistence (y-leveldb)
// needs a native module that bench/node does not build.
//
// Prints one JSON line on stdout once bound: {"event": "listening", "url": "ws://127.0.0.1:PORT",
// "pid": PID}. Everything else goes to stderr. SIGTERM/SIGINT: close everything and exit 0.

import http from 'node:http'
import { register } from 'node:module'

// @y/websocket-server/utils imports y-leveldb statically but uses it only when YPERSISTENCE
// is set. bench/node installs without optional dependencies (no native leveldown), so
// resolve y-leveldb to a stub; memory-only behaviour is unchanged.
delete process.env.YPERSISTENCE
const STUB = 'export class LeveldbPersistence { constructor () { ' +
  "throw new Error('the benchmark reference server is memory-only') } }"
const HOOKS = `
export async function resolve (specifier, context, next) {
  if (specifier === 'y-leveldb') {
    return { url: 'data:text/javascript,' + encodeURIComponent(${JSON.stringify(STUB)}), shortCircuit: true }
  }
  return next(specifier, context)
}
`
register('data:text/javascript,' + encodeURIComponent(HOOKS))

// stdout carries only the listening line
console.log = console.info = console.debug = (...args) => console.error(...args)

const { WebSocketServer } = await import('ws')
const { setupWSConnection, setPersistence, docs } = await import('@y/websocket-server/utils')

const opts = { host: '127.0.0.1', port: 0, loadDir: null }
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i += 2) {
  if (argv[i] === '--host') opts.host = argv[i + 1]
  else if (argv[i] === '--port') opts.port = Number.parseInt(argv[i + 1], 10)
  else if (argv[i] === '--load-dir') opts.loadDir = argv[i + 1]
  else throw new Error(`unknown argument ${argv[i]}; usage: --host H --port P [--load-dir DIR]`)
}

if (opts.loadDir !== null) {
  const { readFileSync } = await import('node:fs')
  const path = await import('node:path')
  const Y = await import('yjs')
  setPersistence({
    provider: null,
    bindState: (docName, ydoc) => {
      let data
      try {
        data = readFileSync(path.join(opts.loadDir, encodeURIComponent(docName) + '.bin'))
      } catch (err) {
        if (err.code === 'ENOENT') return // a new document
        throw err
      }
      Y.applyUpdate(ydoc, new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
    },
    writeState: async () => {}
  })
}

const server = http.createServer((_request, response) => {
  response.writeHead(200, { 'Content-Type': 'text/plain' })
  response.end('okay')
})
const wss = new WebSocketServer({ noServer: true })
wss.on('connection', setupWSConnection)
server.on('upgrade', (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, (ws) => wss.emit('connection', ws, request))
})
server.on('error', (err) => {
  console.error(`reference server: ${err.stack || err}`)
  process.exit(1)
})
server.listen(opts.port, opts.host, () => {
  const { port } = server.address()
  process.stdout.write(JSON.stringify({
    event: 'listening', url: `ws://${opts.host}:${port}`, pid: process.pid
  }) + '\n')
})

let stopping = false
const stop = (signal) => {
  if (stopping) return
  stopping = true
  console.error(`reference server: ${signal}; ${wss.clients.size} connection(s), ${docs.size} doc(s) in memory`)
  for (const ws of wss.clients) ws.terminate()
  wss.close()
  server.close(() => process.exit(0))
  setTimeout(() => process.exit(0), 1000).unref() // ping intervals must not keep us alive
}
process.on('SIGTERM', () => stop('SIGTERM'))
process.on('SIGINT', () => stop('SIGINT'))
