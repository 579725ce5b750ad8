// Grey-scale PNG of integer ids, both ways, in the browser: 8-bit for label ids, 16-bit for instance ids
// (Cityscapes' *_labelIds.png / *_instanceIds.png). A canvas cannot do this: it stores 8-bit RGBA and
// would round 16-bit ids. zlib comes from the browser's CompressionStream / DecompressionStream.

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function pipe(bytes, stream) {
  const out = new Response(new Blob([bytes]).stream().pipeThrough(stream));
  return new Uint8Array(await out.arrayBuffer());
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

// ids: Uint8Array (bits 8) or Uint16Array (bits 16) of width * height -> PNG bytes
export async function encodeIds(width, height, ids, bits) {
  const bpp = bits / 8;
  const raw = new Uint8Array(height * (1 + width * bpp));
  for (let y = 0; y < height; y++) {
    const row = y * (1 + width * bpp); // filter byte 0 (none), then the row
    for (let x = 0; x < width; x++) {
      const v = ids[y * width + x];
      if (bpp === 1) raw[row + 1 + x] = v;
      else {
        raw[row + 1 + 2 * x] = v >> 8; // PNG is big-endian
        raw[row + 2 + 2 * x] = v & 0xff;
      }
    }
  }
  const header = new Uint8Array(13);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, width);
  hv.setUint32(4, height);
  header[8] = bits; // bit depth; colour type 0 (grey), deflate, adaptive filters, no interlace
  const parts = [
    new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]),
    chunk("IHDR", header),
    chunk("IDAT", await pipe(raw, new CompressionStream("deflate"))),
    chunk("IEND", new Uint8Array(0)),
  ];
  return new Blob(parts, { type: "image/png" });
}

function paeth(a, b, c) {
  const p = a + b - c;
  const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

// PNG bytes (grey 8/16-bit or palette-indexed 8-bit, not interlaced) -> {width, height, ids: Uint16Array}
export async function decodeIds(bytes) {
  const sig = [137, 80, 78, 71, 13, 10, 26, 10];
  if (bytes.length < 8 || sig.some((v, i) => bytes[i] !== v)) throw new Error("not a PNG file");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 8, width = 0, height = 0, bits = 0, colour = 0, interlace = 0;
  const idat = [];
  while (pos + 8 <= bytes.length) {
    const len = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + len);
    if (type === "IHDR") {
      width = view.getUint32(pos + 8);
      height = view.getUint32(pos + 12);
      bits = data[8];
      colour = data[9];
      interlace = data[12];
    } else if (type === "IDAT") idat.push(data);
    else if (type === "IEND") break;
    pos += 12 + len;
  }
  if (!((colour === 0 && (bits === 8 || bits === 16)) || (colour === 3 && bits === 8)) || interlace)
    throw new Error(`a map is a grey 8- or 16-bit PNG of ids (this one: colour type ${colour}, ${bits} bits)`);
  const raw = await pipe(new Blob(idat), new DecompressionStream("deflate"));
  const bpp = bits / 8, stride = width * bpp;
  const cur = new Uint8Array(stride), prev = new Uint8Array(stride);
  const ids = new Uint16Array(width * height);
  for (let y = 0; y < height; y++) {
    const base = y * (stride + 1), filter = raw[base];
    for (let i = 0; i < stride; i++) {
      const x = raw[base + 1 + i], a = i >= bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
      cur[i] = (x + [0, a, b, (a + b) >> 1, paeth(a, b, c)][filter]) & 0xff;
    }
    for (let i = 0; i < width; i++) ids[y * width + i] = bpp === 1 ? cur[i] : (cur[2 * i] << 8) | cur[2 * i + 1];
    prev.set(cur);
  }
  return { width, height, ids };
}
