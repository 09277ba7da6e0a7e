// The database refuses writes while this runs. Adds COUNT jobs with
// attempts: 3 and exponential backoff (200 ms), and PLAIN jobs without
// retry options. Prints {"phase":"retried"} once every retrying job has
// failed two attempts (the Rust test then lets the database accept writes
// again), then waits for every job to complete and prints, per job, the
// backoff delays BullMQ applied (from its `delayed` events) and attemptsMade.
import { Job, Queue, QueueEvents } from 'bullmq';
import { env, emit, queueOptions, plainEvent, deadline } from './lib.mjs';

const count = Number(process.env.COUNT ?? 10);
const plain = Number(process.env.PLAIN ?? 3);
const queue = new Queue(env.queue, queueOptions());
// From the start of this queue's (fresh) event stream: a QueueEvents that
// started reading at '$' could miss a job that finished before its first read.
const events = new QueueEvents(env.queue, queueOptions({ lastEventId: '0-0' }));
await events.waitUntilReady();
await queue.waitUntilReady();

const delays = new Map(); // jobId -> [ms between the failure and the due time]
const finished = new Map();
let ids = new Set();
let retryingIds = new Set();
let resolveRetried;
let resolveDone;
const retried = new Promise((r) => (resolveRetried = r));
const done = new Promise((r) => (resolveDone = r));
const checkRetried = () =>
  retryingIds.size > 0 && [...retryingIds].every((id) => (delays.get(id) ?? []).length >= 2) && resolveRetried();
const checkDone = () => ids.size > 0 && [...ids].every((id) => finished.has(id)) && resolveDone();

events.on('delayed', ({ jobId, delay }, eventId) => {
  const at = Number(eventId.split('-')[0]);
  const list = delays.get(jobId) ?? [];
  list.push(Number(delay) - at);
  delays.set(jobId, list);
  checkRetried();
});
events.on('completed', ({ jobId }) => {
  finished.set(jobId, 'completed');
  checkDone();
});
events.on('failed', ({ jobId, failedReason }) => {
  finished.set(jobId, `failed: ${failedReason}`);
  checkDone();
});

const retrying = await queue.addBulk(
  Array.from({ length: count }, (_, i) => ({
    name: 'audit.event',
    data: plainEvent(i, { tag: 'retry' }),
    opts: { attempts: 3, backoff: { type: 'exponential', delay: 200 } },
  })),
);
const plainJobs = await queue.addBulk(
  Array.from({ length: plain }, (_, i) => ({
    name: 'audit.event',
    data: plainEvent(count + i, { tag: 'retry' }),
  })),
);
retryingIds = new Set(retrying.map((j) => j.id));
ids = new Set([...retrying, ...plainJobs].map((j) => j.id));

let timedOut = false;
await Promise.race([retried, deadline(env.timeoutMs, 'two failed attempts per job')]).catch(() => {
  timedOut = true;
});
emit({ phase: 'retried', timedOut });
if (!timedOut) {
  checkDone();
  await Promise.race([done, deadline(env.timeoutMs, 'every job to complete')]).catch(() => {
    timedOut = true;
  });
}

const describe = async (j, kind) => {
  const job = await Job.fromId(queue, j.id);
  return {
    kind,
    id: j.id,
    event: finished.get(j.id) ?? null,
    state: await job.getState(),
    attemptsMade: job.attemptsMade,
    delays: delays.get(j.id) ?? [],
    returnvalue: job.returnvalue ?? null,
  };
};
const jobs = [];
for (const j of retrying) jobs.push(await describe(j, 'retrying'));
for (const j of plainJobs) jobs.push(await describe(j, 'plain'));
emit({ phase: 'done', timedOut, jobs });
await events.close();
await queue.close();
