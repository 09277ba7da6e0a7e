// 5,000 (COUNT) jobs added with one addBulk; QueueEvents reports each one
// completed (or failed). Prints what Node saw: counts, whether every return
// value parsed as the documented JSON object, and the stored outcomes.
import { Queue, QueueEvents } from 'bullmq';
import { env, emit, queueOptions, plainEvent, deadline } from './lib.mjs';

const count = Number(process.env.COUNT ?? 5000);
// Keep every event for the observer: 4 events per job (added, waiting,
// active, completed) must not be trimmed before QueueEvents reads them.
const queue = new Queue(env.queue, queueOptions({ streams: { events: { maxLen: count * 10 } } }));
// From the start of this queue's (fresh) event stream: a QueueEvents that
// started reading at '$' could miss a job that finished before its first read.
const events = new QueueEvents(env.queue, queueOptions({ lastEventId: '0-0' }));
await events.waitUntilReady();
await queue.waitUntilReady();

const completed = new Map();
const failed = new Map();
let resolveDone;
const done = new Promise((r) => (resolveDone = r));
const check = () => completed.size + failed.size >= count && resolveDone();
events.on('completed', ({ jobId, returnvalue }) => {
  completed.set(jobId, returnvalue);
  check();
});
events.on('failed', ({ jobId, failedReason }) => {
  failed.set(jobId, failedReason);
  check();
});

// Every third event has no eventId: its key is the job identity.
const jobs = Array.from({ length: count }, (_, i) => ({
  name: 'audit.event',
  data: plainEvent(i, { anonymous: i % 3 === 0, tag: 'bulk' }),
}));
const added = await queue.addBulk(jobs);
const ids = new Set(added.map((j) => j.id));

let timedOut = false;
await Promise.race([done, deadline(env.timeoutMs, 'every job to finish')]).catch(() => {
  timedOut = true;
});

let parsed = 0;
const stored = { inserted: 0, duplicate: 0 };
const keys = new Set();
const bad = [];
for (const [jobId, rv] of completed) {
  const ok =
    rv !== null &&
    typeof rv === 'object' &&
    typeof rv.idempotencyKey === 'string' &&
    (rv.stored === 'inserted' || rv.stored === 'duplicate') &&
    /^[0-9a-f]{64}$/.test(rv.hash ?? '');
  if (ok) {
    parsed += 1;
    stored[rv.stored] += 1;
    keys.add(rv.idempotencyKey);
  } else if (bad.length < 5) {
    bad.push({ jobId, returnvalue: rv });
  }
}
emit({
  added: added.length,
  distinctIds: ids.size,
  completed: completed.size,
  completedOfOurs: [...completed.keys()].filter((id) => ids.has(id)).length,
  failed: failed.size,
  failedReasons: [...failed.values()].slice(0, 5),
  parsed,
  stored,
  distinctKeys: keys.size,
  bad,
  timedOut,
});
await events.close();
await queue.close();
