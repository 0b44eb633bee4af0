// @tus/server with its FileStore: the bench's tus peer (python -m bench --protocol tus).
// node bench/tus_server.js DIRECTORY PORT   (NODE_PATH: tests/js/node_modules)
'use strict'

const { Server } = require('@tus/server')
const { FileStore } = require('@tus/file-store')

const [directory, port] = process.argv.slice(2)
const server = new Server({
  path: '/files',
  datastore: new FileStore({ directory }),
  respectForwardedHeaders: false,
})
server.listen({ host: '127.0.0.1', port: Number(port) }, () => {
  process.stdout.write(`tus server listening on http://127.0.0.1:${port}\n`)
})
