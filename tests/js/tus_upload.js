// Upload a file to a tus endpoint with tus-js-client, as an application would.
//
// node tus_upload.js '{"endpoint": "...", "path": "...", ...}'
// Options: chunkSize, parallelUploads, metadata, urlStorage (a file: resume what an earlier
// run began), checksum (send Upload-Checksum: sha1 of every PATCH), headers, protocol
// ("tus-v1", "ietf-draft-03" or "ietf-draft-05"), uploadDataDuringCreation, retryDelays.
// Prints JSON lines: {"event": "progress", "sent": n}, then {"event": "success", "url": ...}
// or {"event": "error", "message": ...} (exit status 1).
'use strict'

const crypto = require('crypto')
const fs = require('fs')
const tus = require('tus-js-client')

const options = JSON.parse(process.argv[2])
const say = (event) => process.stdout.write(JSON.stringify(event) + '\n')

// The sha1 of the bytes a PATCH carries: its offset is in the request, its length is the
// chunk size or what is left of the file.
function checksumOf(path, offset, chunkSize, size) {
  const length = Math.min(chunkSize, size - offset)
  const buffer = Buffer.alloc(length)
  const fd = fs.openSync(path, 'r')
  try {
    fs.readSync(fd, buffer, 0, length, offset)
  } finally {
    fs.closeSync(fd)
  }
  return 'sha1 ' + crypto.createHash('sha1').update(buffer).digest('base64')
}

async function main() {
  const size = fs.statSync(options.path).size
  const storage = options.urlStorage ? { urlStorage: new tus.FileUrlStorage(options.urlStorage) } : {}
  const upload = new tus.Upload(fs.createReadStream(options.path), {
    ...storage,
    storeFingerprintForResuming: Boolean(options.urlStorage),
    endpoint: options.endpoint,
    chunkSize: options.chunkSize || Infinity,
    parallelUploads: options.parallelUploads || 1,
    metadata: options.metadata || {},
    headers: options.headers || {},
    protocol: options.protocol || 'tus-v1',
    uploadDataDuringCreation: Boolean(options.uploadDataDuringCreation),
    retryDelays: options.retryDelays || [0, 200, 500, 1000, 2000],
    fingerprint: async () => 'chunkserver-test-' + options.path,
    removeFingerprintOnSuccess: true,
    onBeforeRequest(req) {
      if (options.checksum && req.getMethod() === 'PATCH') {
        const offset = Number(req.getHeader('Upload-Offset'))
        req.setHeader('Upload-Checksum', checksumOf(options.path, offset, options.chunkSize, size))
      }
    },
    onProgress(sent) {
      say({ event: 'progress', sent })
    },
    onSuccess() {
      say({ event: 'success', url: upload.url })
    },
    onError(error) {
      say({ event: 'error', message: String(error) })
      process.exitCode = 1
    },
  })
  if (options.urlStorage) {
    const previous = await upload.findPreviousUploads()
    if (previous.length > 0) {
      say({ event: 'resuming', from: previous[0].uploadUrl || previous[0].parallelUploadUrls })
      upload.resumeFromPreviousUpload(previous[0])
    }
  }
  upload.start()
}

main()
