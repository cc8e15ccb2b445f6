#!/usr/bin/env node
// Hocuspocus for the benchmarks: @hocuspocus/server 3.4 (the last line that runs on
// Node 20; 4.x needs Node >= 22), yjs 13.6, memory only unless --load-dir is given.
//
//   node hocuspocus_server.mjs [--host 127.0.0.1] [--port 0] [--load-dir DIR]
//                              [--redis-host H --redis-port P]
//
// --load-dir DIR: Hocuspocus has no built-in store (its SQLite extension needs the native
// sqlite3 module, which bench/node does not build). With this flag an onLoadDocument hook
// reads DIR/<encodeURIComponent(name)>.bin (one Yjs update) when a document is first
// opened and applies it before the document is served, as a database extension's fetch
// would; nothing is ever written back. Used by bench/coldstart.py for a stored document.
//
// --redis-host H --redis-port P: adds @hocuspocus/extension-redis 3.4 (ioredis pub/sub on
// that Redis, default options: prefix "hocuspocus", a random instance identifier), so
// several instances share their documents (used by bench/fanout_cluster.py). The listening
// line is printed only once both of its Redis connections answer PING.
//
// Hocuspocus speaks its own framing on the wire: every message starts with the document
// name (a var string), and a connection must send an Auth message for a document before
// its sync messages are handled (bench/coldstart.py does; no onAuthenticate hook is set,
// so any token is accepted).
//
// Prints one JSON line on stdout once bound: {"event": "listening", "url": "ws://HOST:PORT",
// "pid": PID}. Everything else goes to stderr. SIGTERM/SIGINT: Hocuspocus's own handler
// destroys the server and exits 0.

import { readFile } from 'node:fs/promises'
import path from 'node:path'

// stdout carries only the listening line
console.log = console.info = console.debug = (...args) => console.error(...args)

const { Server } = await import('@hocuspocus/server')
const Y = await import('yjs')

const opts = { host: '127.0.0.1', port: 0, loadDir: null, redisHost: null, redisPort: null }
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i += 2) {
  if (argv[i] === '--host') opts.host = argv[i + 1]
  else if (argv[i] === '--port') opts.port = Number.parseInt(argv[i + 1], 10)
  else if (argv[i] === '--load-dir') opts.loadDir = argv[i + 1]
  else if (argv[i] === '--redis-host') opts.redisHost = argv[i + 1]
  else if (argv[i] === '--redis-port') opts.redisPort = Number.parseInt(argv[i + 1], 10)
  else {
    throw new Error(`unknown argument ${argv[i]}; usage: --host H --port P [--load-dir DIR] ` +
      '[--redis-host H --redis-port P]')
  }
}
if ((opts.redisHost === null) !== (opts.redisPort === null) || Number.isNaN(opts.redisPort)) {
  throw new Error('--redis-host and --redis-port go together')
}

const configuration = {
  address: opts.host,
  port: opts.port,
  quiet: true,
  stopOnSignals: true
}
if (opts.loadDir !== null) {
  configuration.onLoadDocument = async ({ documentName, document }) => {
    const file = path.join(opts.loadDir, encodeURIComponent(documentName) + '.bin')
    let data
    try {
      data = await readFile(file)
    } catch (err) {
      if (err.code === 'ENOENT') return // a new document
      throw err
    }
    Y.applyUpdate(document, new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
  }
}

let redis = null
if (opts.redisHost !== null) {
  const { Redis } = await import('@hocuspocus/extension-redis')
  redis = new Redis({ host: opts.redisHost, port: opts.redisPort })
  configuration.extensions = [redis]
}

const server = new Server(configuration)
server.httpServer.on('error', (err) => {
  console.error(`hocuspocus server: ${err.stack || err}`)
  process.exit(1)
})
await server.listen()
if (redis !== null) {
  // (ioredis retries forever; bench/common.py bounds the wait for the listening line)
  await Promise.all([redis.pub.ping(), redis.sub.ping()])
}
process.stdout.write(JSON.stringify({
  event: 'listening', url: `ws://${opts.host}:${server.address.port}`, pid: process.pid
}) + '\n')
