// Adds COUNT audit-event jobs with addBulk (in chunks of 1,000); every
// ANON_EVERY-th has no eventId, so its idempotency key is the job identity.
// Prints the number added and the first and last job id.
import { Queue } from 'bullmq';
import { env, emit, queueOptions, plainEvent } from './lib.mjs';

const count = Number(process.env.COUNT ?? 1000);
const anonEvery = Number(process.env.ANON_EVERY ?? 2);
const tag = process.env.TAG ?? 'add';
const queue = new Queue(env.queue, queueOptions());
let first = null;
let last = null;
for (let start = 0; start < count; start += 1000) {
  const n = Math.min(1000, count - start);
  const added = await queue.addBulk(
    Array.from({ length: n }, (_, k) => ({
      name: 'audit.event',
      data: plainEvent(start + k, { anonymous: (start + k) % anonEvery === 0, tag }),
    })),
  );
  first ??= added[0].id;
  last = added[added.length - 1].id;
}
emit({ added: count, first, last });
await queue.close();
