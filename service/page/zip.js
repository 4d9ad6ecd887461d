// A minimal zip reader for the batch view: stored and deflated entries, no zip64, no encryption.
// Deflate is the browser's own (DecompressionStream "deflate-raw"), so no library is needed.
"use strict";

const IMAGE_NAME = /\.(png|jpe?g|gif|bmp|webp|tiff?)$/i;

async function readZip(buffer) {
  const view = new DataView(buffer);
  const eocd = findEndOfCentralDirectory(view);
  const count = view.getUint16(eocd + 10, true);
  let at = view.getUint32(eocd + 16, true); // central directory offset
  const entries = [];
  for (let i = 0; i < count; i++) {
    if (view.getUint32(at, true) !== 0x02014b50) throw new Error("not a zip: bad central directory");
    const method = view.getUint16(at + 10, true);
    const size = view.getUint32(at + 20, true);
    const nameLength = view.getUint16(at + 28, true);
    const skip = nameLength + view.getUint16(at + 30, true) + view.getUint16(at + 32, true);
    const local = view.getUint32(at + 42, true);
    const name = new TextDecoder().decode(new Uint8Array(buffer, at + 46, nameLength));
    at += 46 + skip;
    if (name.endsWith("/") || !IMAGE_NAME.test(name) || name.includes("__MACOSX")) continue;
    const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    const data = new Uint8Array(buffer, start, size);
    entries.push({ name, blob: await inflate(data, method) });
  }
  return entries;
}

function findEndOfCentralDirectory(view) {
  for (let at = view.byteLength - 22; at >= Math.max(0, view.byteLength - 22 - 65535); at--) {
    if (view.getUint32(at, true) === 0x06054b50) return at;
  }
  throw new Error("not a zip file (no end of central directory)");
}

async function inflate(data, method) {
  if (method === 0) return new Blob([data]);
  if (method !== 8) throw new Error(`zip compression method ${method} is not supported`);
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return await new Response(stream).blob();
}
