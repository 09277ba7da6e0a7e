// Adds COUNT audit-event jobs with addBulk (in chunks of 1,000); every
// ANON_EVERY-th has no eventId, so its idempotency key is the job identity.
// With BLOB_BYTES, every event carries a string of that many bytes (the
// flood of huge jobs), added one job per call. Prints the number added and the first and last job id.
import { Queue } from 'bullmq';
import { env, emit, queueOptions, plainEvent } from './lib.mjs';

const count = Number(process.env.COUNT ?? 1000);
const anonEvery = Number(process.env.ANON_EVERY ?? 2);
const tag = process.env.TAG ?? 'add';
const blobBytes = Number(process.env.BLOB_BYTES ?? 0);
const chunk = blobBytes > 0 ? 1 : 1000;
const blob = blobBytes > 0 ? 'A'.repeat(blobBytes) : null;
const build = (i) => {
  const data = plainEvent(i, { anonymous: i % anonEvery === 0, tag });
  if (blob) data.blob = blob;
  return data;
};
const queue = new Queue(env.queue, queueOptions());
let first = null;
let last = null;
for (let start = 0; start < count; start += chunk) {
  const n = Math.min(chunk, count - start);
  const added = await queue.addBulk(
    Array.from({ length: n }, (_, k) => ({ name: 'audit.event', data: build(start + k) })),
  );
  first ??= added[0].id;
  last = added[added.length - 1].id;
}
emit({ added: count, first, last });
await queue.close();
