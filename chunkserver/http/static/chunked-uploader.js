// chunked-uploader.js: chunkserver's browser uploader, an ES module with no dependencies.
//
//   import { ChunkedUploader } from '/static/chunked-uploader.js';
//   const uploader = new ChunkedUploader('', { chunkSize: 4 * 1024 * 1024, concurrency: 3 });
//   const result = await uploader.upload(file, { onProgress: (p) => console.log(p.fraction) });
//
// It keeps the seed's ChunkedUploader API (createChunks, uploadChunk, generateUUID, uploadFile)
// and adds: parallel chunks, retries with capped exponential backoff and jitter, resume (the
// file id is remembered in localStorage under the file's name, size and last-modified time, and
// only the server's missing_chunks are sent), pause (stop), abort (DELETE), progress with bytes
// and speed, an optional bearer token, and verification: each chunk is sent with its
// CRC-64/NVME (checked by the server), and the file's CRC, combined from the chunks', must
// equal the server's crc64nvme at the end.

import { crc64nvme, crc64Combine, toS3 } from './crc64nvme.js';

const RETRYABLE = new Set([408, 429, 500, 502, 503, 504, 507]);

export class UploadError extends Error {
  constructor(message, status = null) {
    super(message);
    this.name = 'UploadError';
    this.status = status;
  }
}

export class UploadStopped extends Error {
  constructor() {
    super('Upload stopped');
    this.name = 'UploadStopped';
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(new UploadStopped());
    }, { once: true });
  });
}

export class ChunkedUploader {
  constructor(apiUrl = '', options = {}) {
    this.apiUrl = apiUrl.replace(/\/$/, '');
    this.chunkSize = options.chunkSize ?? 1024 * 1024;
    this.concurrency = options.concurrency ?? 3;
    this.retries = options.retries ?? 5;
    this.backoffBase = options.backoffBase ?? 250; // ms
    this.backoffCap = options.backoffCap ?? 10000; // ms
    this.token = options.token ?? null;
    // The upload's own data ({user: "42"}): sent with every chunk as the `metadata` field.
    this.metadata = options.metadata ?? null;
    this.storage = options.storage ?? (typeof localStorage !== 'undefined' ? localStorage : null);
    this.controllers = new Map(); // fileId -> AbortController of the running upload
  }

  // -- the seed's API ---------------------------------------------------------------------

  createChunks(file) {
    const chunks = [];
    for (let start = 0; start < file.size; start += this.chunkSize) {
      chunks.push(file.slice(start, Math.min(start + this.chunkSize, file.size)));
    }
    if (chunks.length === 0) chunks.push(file.slice(0, 0)); // an empty file is one empty chunk
    return chunks;
  }

  generateUUID() {
    if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
    return 'xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx'.replace(/[xy]/g, (c) => {
      const r = (Math.random() * 16) | 0;
      return (c === 'x' ? r : (r & 0x3) | 0x8).toString(16);
    });
  }

  async uploadChunk(fileId, chunkIndex, chunk, filename, totalChunks, signal = undefined,
    extraFields = {}) {
    const formData = new FormData();
    formData.append('file_id', fileId);
    formData.append('chunk_index', chunkIndex.toString());
    formData.append('total_chunks', totalChunks.toString());
    formData.append('filename', filename);
    if (this.metadata) formData.append('metadata', JSON.stringify(this.metadata));
    for (const [name, value] of Object.entries(extraFields)) formData.append(name, value);
    formData.append('chunk', chunk);
    const response = await fetch(`${this.apiUrl}/upload-chunk`, {
      method: 'POST',
      body: formData,
      headers: await this.headers(),
      signal,
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new UploadError(body.detail ?? `HTTP ${response.status}`, response.status);
    }
    return body;
  }

  // -- status, resume, abort ----------------------------------------------------------------

  // The Authorization header of the next request: `options.token` is a string, or a
  // function (async or not) returning a fresh one before each request (a short-lived JWT).
  async headers() {
    const token = typeof this.token === 'function' ? await this.token() : this.token;
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  resumeKey(file) {
    return `chunkserver:${file.name}:${file.size}:${file.lastModified}`;
  }

  rememberedId(file) {
    return this.storage?.getItem(this.resumeKey(file)) ?? null;
  }

  async status(fileId) {
    const response = await fetch(`${this.apiUrl}/upload-status/${encodeURIComponent(fileId)}`, {
      headers: await this.headers(),
    });
    return response.json();
  }

  // Stop sending; the upload can be resumed later with uploadFile(file).
  pause(fileId) {
    this.controllers.get(fileId)?.abort();
  }

  // Stop sending and remove what the server has of this upload.
  async abort(fileId, file = null) {
    this.pause(fileId);
    if (file) this.storage?.removeItem(this.resumeKey(file));
    await fetch(`${this.apiUrl}/uploads/${encodeURIComponent(fileId)}`, {
      method: 'DELETE',
      headers: await this.headers(),
    });
  }

  // -- the upload -------------------------------------------------------------------------

  // The seed's call: resolves with the file id; onProgress(chunksDone, totalChunks).
  async uploadFile(file, onProgress = null) {
    const result = await this.upload(file, {
      onProgress: onProgress && ((p) => onProgress(p.chunksDone, p.totalChunks)),
    });
    return result.file_id;
  }

  // Upload a File or Blob with a name; resumes a remembered upload of the same file.
  // Resolves with the server's completed answer (file_id, size, crc64nvme, ...) plus
  // verified: true once the file's CRC matched; rejects with
  // UploadError, or UploadStopped after pause() or abort(). onProgress gets an object:
  // { fileId, bytesDone, totalBytes, chunksDone, totalChunks, fraction, seconds, bytesPerSecond }.
  async upload(file, { onProgress = null, fileId = null } = {}) {
    const chunks = this.createChunks(file);
    const totalChunks = chunks.length;
    fileId = fileId ?? this.rememberedId(file) ?? this.generateUUID();
    this.storage?.setItem(this.resumeKey(file), fileId);

    let missing = chunks.map((_, i) => i);
    const status = await this.status(fileId);
    if (status.status === 'completed') {
      this.report(onProgress, fileId, file.size, file.size, totalChunks, totalChunks, 0, 0);
      const local = toS3(await this.fileCrc(chunks, new Array(totalChunks)));
      if (status.crc64nvme !== local) {
        throw new UploadError(`crc64nvme mismatch: server ${status.crc64nvme}, local ${local}`);
      }
      return { ...status, file_id: fileId, verified: true };
    }
    if (status.status === 'uploading') {
      if (status.total_chunks !== totalChunks) {
        throw new UploadError(`The server holds this upload in ${status.total_chunks} chunks; ` +
          `use the chunk size it was started with`);
      }
      missing = status.missing_chunks;
    }

    const controller = new AbortController();
    this.controllers.set(fileId, controller);
    const sending = new Set(missing);
    let bytesDone = 0;
    let chunksDone = 0;
    chunks.forEach((chunk, i) => {
      if (!sending.has(i)) {
        bytesDone += chunk.size;
        chunksDone += 1;
      }
    });
    const started = performance.now();
    const bytesAtStart = bytesDone;
    let completed = null;
    this.report(onProgress, fileId, bytesDone, file.size, chunksDone, totalChunks, 0, 0);

    const crcs = new Array(totalChunks);
    const fields = { total_size: file.size.toString(), chunk_size: this.chunkSize.toString() };
    const queue = [...missing];
    const worker = async () => {
      while (queue.length > 0) {
        const index = queue.shift();
        // Read once: the CRC is computed on the bytes that are sent.
        const bytes = new Uint8Array(await chunks[index].arrayBuffer());
        crcs[index] = crc64nvme(bytes);
        const answer = await this.sendWithRetries(fileId, index, new Blob([bytes]), file.name,
          totalChunks, controller.signal,
          { ...fields, chunk_crc64nvme: toS3(crcs[index]) });
        if (answer.status === 'completed') completed = answer;
        bytesDone += chunks[index].size;
        chunksDone += 1;
        const seconds = (performance.now() - started) / 1000;
        this.report(onProgress, fileId, bytesDone, file.size, chunksDone, totalChunks,
          seconds, seconds > 0 ? (bytesDone - bytesAtStart) / seconds : 0);
      }
    };
    try {
      await Promise.all(Array.from({ length: Math.min(this.concurrency, queue.length) }, worker));
    } catch (error) {
      controller.abort();
      throw controller.signal.aborted && error.name === 'AbortError' ? new UploadStopped() : error;
    } finally {
      this.controllers.delete(fileId);
    }
    completed = completed ?? await this.status(fileId);
    if (completed.status !== 'completed') {
      throw new UploadError(`Every chunk was sent but the upload is ${completed.status}`);
    }
    const local = toS3(await this.fileCrc(chunks, crcs));
    if (completed.crc64nvme !== local) {
      throw new UploadError(`crc64nvme mismatch: server ${completed.crc64nvme}, local ${local}`);
    }
    this.storage?.removeItem(this.resumeKey(file));
    return { ...completed, file_id: fileId, verified: true };
  }

  // The file's CRC-64/NVME from its chunks' (those not sent this time are read for it).
  async fileCrc(chunks, crcs) {
    let whole = 0n;
    for (let i = 0; i < chunks.length; i += 1) {
      if (crcs[i] === undefined) crcs[i] = crc64nvme(new Uint8Array(await chunks[i].arrayBuffer()));
      whole = crc64Combine(whole, crcs[i], chunks[i].size);
    }
    return whole;
  }

  async sendWithRetries(fileId, index, chunk, filename, totalChunks, signal, extraFields = {}) {
    for (let attempt = 0; ; attempt += 1) {
      if (signal.aborted) throw new UploadStopped();
      try {
        return await this.uploadChunk(fileId, index, chunk, filename, totalChunks, signal,
          extraFields);
      } catch (error) {
        if (signal.aborted || error.name === 'AbortError') throw new UploadStopped();
        // A TypeError is fetch's network failure; other statuses are the client's fault.
        const retryable = error instanceof TypeError || RETRYABLE.has(error.status);
        if (!retryable || attempt >= this.retries) throw error;
        const delay = Math.min(this.backoffCap, this.backoffBase * 2 ** attempt);
        await sleep(delay * (0.5 + Math.random() / 2), signal);
      }
    }
  }

  report(onProgress, fileId, bytesDone, totalBytes, chunksDone, totalChunks, seconds, speed) {
    if (!onProgress) return;
    onProgress({
      fileId,
      bytesDone,
      totalBytes,
      chunksDone,
      totalChunks,
      fraction: totalBytes > 0 ? bytesDone / totalBytes : chunksDone / totalChunks,
      seconds,
      bytesPerSecond: speed,
    });
  }
}
