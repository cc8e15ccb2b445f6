#!/usr/bin/env node
// The reference y-websocket server (@y/websocket-server 0.1.1, memory only) on loopback.
//
//   node reference_server.mjs [--host 127.0.0.1] [--port 0]
//
// Binds the port itself (0 = any free port; pass the announced port again to restart on
// the same address) and prints exactly one JSON line on stdout once listening:
//   {"event": "listening", "url": "ws://127.0.0.1:PORT"}
// Everything else (the package's own logging) goes to stderr. SIGTERM/SIGINT close the
// listener and every connection, then exit with status 0.
//
// The room is the raw URL path up to '?', exactly as the package's setupWSConnection
// takes it (DESIGN: Facts from the anchors); the query string is ignored.

import http from 'node:http'
import { register } from 'node:module'

// @y/websocket-server/utils imports y-leveldb statically, although it only uses it when
// YPERSISTENCE is set. The kit is memory-only and installs without optional dependencies
// (tests/interop/.npmrc: no native leveldown), so resolve y-leveldb to a stub that refuses
// to persist. This changes nothing else in the server's behaviour.
delete process.env.YPERSISTENCE
const STUB = 'export class LeveldbPersistence { constructor () { ' +
  "throw new Error('the interop reference server is memory-only') } }"
const HOOKS = `
export async function resolve (specifier, context, next) {
  if (specifier === 'y-leveldb') {
    return { url: 'data:text/javascript,' + encodeURIComponent(${JSON.stringify(STUB)}), shortCircuit: true }
  }
  return next(specifier, context)
}
`
register('data:text/javascript,' + encodeURIComponent(HOOKS))

// Library logging must never reach stdout: stdout carries the one JSON line.
console.log = console.info = console.debug = (...args) => console.error(...args)

const { WebSocketServer } = await import('ws')
const { setupWSConnection, docs } = await import('@y/websocket-server/utils')

const parseArgs = (argv) => {
  const opts = { host: '127.0.0.1', port: 0 }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    const value = argv[i + 1]
    if (arg === '--host' && value !== undefined) {
      opts.host = value
      i++
    } else if (arg === '--port' && value !== undefined) {
      opts.port = Number.parseInt(value, 10)
      if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
        throw new Error(`--port must be an integer in 0..65535, got ${JSON.stringify(value)}`)
      }
      i++
    } else {
      throw new Error(`unknown argument ${JSON.stringify(arg)}; usage: --host H --port P`)
    }
  }
  return opts
}

const opts = parseArgs(process.argv.slice(2))

const server = http.createServer((_request, response) => {
  response.writeHead(200, { 'Content-Type': 'text/plain' })
  response.end('okay')
})
const wss = new WebSocketServer({ noServer: true })
wss.on('connection', setupWSConnection)
server.on('upgrade', (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, (ws) => {
    wss.emit('connection', ws, request)
  })
})

server.on('error', (err) => {
  console.error(`reference server: ${err.stack || err}`)
  process.exit(1)
})

server.listen(opts.port, opts.host, () => {
  const { port } = server.address()
  const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host
  process.stdout.write(JSON.stringify({ event: 'listening', url: `ws://${host}:${port}` }) + '\n')
})

let stopping = false
const stop = (signal) => {
  if (stopping) return
  stopping = true
  console.error(`reference server: ${signal}, closing ${wss.clients.size} connection(s), ` +
    `${docs.size} room(s) in memory`)
  for (const ws of wss.clients) ws.terminate()
  wss.close()
  server.close(() => process.exit(0))
  // setupWSConnection's ping intervals keep the loop alive; never hang on the way out
  setTimeout(() => process.exit(0), 1000).unref()
}
process.on('SIGTERM', () => stop('SIGTERM'))
process.on('SIGINT', () => stop('SIGINT'))
