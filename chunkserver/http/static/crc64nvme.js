// crc64nvme.js: CRC-64/NVME (S3's default full-object checksum) in plain JavaScript.
//
//   import { crc64nvme, crc64Combine, toS3 } from '/static/crc64nvme.js';
//   const crc = crc64nvme(new Uint8Array(buffer));           // a BigInt
//   const whole = crc64Combine(crcA, crcB, lengthOfB);       // the CRC of A then B
//   toS3(whole);                                              // base64 of the 8 big-endian bytes
//
// Reflected polynomial 0x9a6c9329ac4bc9b5, initial value and final xor all ones; the check
// value of "123456789" is 0xae8b14860a799888. Bytes go through a 256-entry table kept as two
// Uint32Arrays (BigInt arithmetic per byte would be far slower); combining uses the
// polynomial arithmetic of zlib's crc32_combine, in BigInt, once per chunk.

const POLY = 0x9a6c9329ac4bc9b5n;
const MASK = 0xffffffffffffffffn;
const TABLE_LO = new Uint32Array(256);
const TABLE_HI = new Uint32Array(256);

for (let n = 0; n < 256; n += 1) {
  let c = BigInt(n);
  for (let k = 0; k < 8; k += 1) c = c & 1n ? (c >> 1n) ^ POLY : c >> 1n;
  TABLE_LO[n] = Number(c & 0xffffffffn);
  TABLE_HI[n] = Number(c >> 32n);
}

// The CRC of `bytes` (a Uint8Array), continuing `previous` (the CRC of the bytes before).
export function crc64nvme(bytes, previous = 0n) {
  const start = ~previous & MASK;
  let lo = Number(start & 0xffffffffn) >>> 0;
  let hi = Number(start >> 32n) >>> 0;
  for (let i = 0; i < bytes.length; i += 1) {
    const index = (lo ^ bytes[i]) & 0xff;
    lo = ((lo >>> 8) | (hi << 24)) ^ TABLE_LO[index];
    hi = (hi >>> 8) ^ TABLE_HI[index];
  }
  return ~((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)) & MASK;
}

// a(x) * b(x) modulo the polynomial, in the reflected bit order (x^0 is the top bit).
function multiplyModP(a, b) {
  let m = 1n << 63n;
  let product = 0n;
  for (;;) {
    if (a & m) {
      product ^= b;
      if ((a & (m - 1n)) === 0n) break;
    }
    m >>= 1n;
    b = b & 1n ? (b >> 1n) ^ POLY : b >> 1n;
  }
  return product;
}

// x^(2^k) modulo the polynomial, for k = 0..63.
const X_TO_2_TO_THE = [1n << 62n];
for (let k = 1; k < 64; k += 1) {
  X_TO_2_TO_THE.push(multiplyModP(X_TO_2_TO_THE[k - 1], X_TO_2_TO_THE[k - 1]));
}

// x^(8n) modulo the polynomial: what appending n zero bytes multiplies a CRC by.
function xToThe8n(n) {
  let p = 1n << 63n;
  let k = 3;
  let remaining = BigInt(n);
  while (remaining > 0n) {
    if (remaining & 1n) p = multiplyModP(X_TO_2_TO_THE[k & 63], p);
    remaining >>= 1n;
    k += 1;
  }
  return p;
}

// The CRC of A followed by B, from A's CRC, B's CRC and B's length in bytes.
export function crc64Combine(crcA, crcB, lengthB) {
  return multiplyModP(xToThe8n(lengthB), crcA) ^ crcB;
}

// S3's form: base64 of the 8 big-endian bytes.
export function toS3(crc) {
  let text = '';
  for (let shift = 56n; shift >= 0n; shift -= 8n) {
    text += String.fromCharCode(Number((crc >> shift) & 0xffn));
  }
  return btoa(text);
}
