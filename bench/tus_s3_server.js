// @tus/server with its S3Store on the bench's Swift: the S3 matrix's tus peer
// (python -m bench --storage s3). Parts of 5 MiB, S3's minimum, as chunkserver gathers.
// node bench/tus_s3_server.js PORT ENDPOINT BUCKET REGION ACCESS_KEY SECRET_KEY
// (NODE_PATH: tests/js/node_modules)
'use strict'

const { Server } = require('@tus/server')
const { S3Store } = require('@tus/s3-store')

const [port, endpoint, bucket, region, accessKeyId, secretAccessKey] = process.argv.slice(2)
const server = new Server({
  path: '/files',
  datastore: new S3Store({
    partSize: 5 * 1024 * 1024,
    s3ClientConfig: {
      bucket,
      region,
      endpoint,
      forcePathStyle: true,
      credentials: { accessKeyId, secretAccessKey },
      // Swift's s3api takes no aws-chunked bodies, which the SDK's default checksums send.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    },
  }),
  respectForwardedHeaders: false,
})
server.listen({ host: '127.0.0.1', port: Number(port) }, () => {
  process.stdout.write(`tus server listening on http://127.0.0.1:${port}\n`)
})
