// Waits until COUNT jobs of the queue are finished (completed + failed,
// by the queue's own counts), then prints what Node sees of every job:
// how many were started or attempted more than once, the kinds of return
// values (audit-worker's JSON, the Node worker's), and failures.
import { Queue } from 'bullmq';
import { env, emit, queueOptions, pollUntil } from './lib.mjs';

const count = Number(process.env.COUNT ?? 1000);
const queue = new Queue(env.queue, queueOptions());
let timedOut = false;
await pollUntil(
  async () => {
    const c = await queue.getJobCounts('completed', 'failed');
    return c.completed + c.failed >= count;
  },
  env.timeoutMs,
  `${count} finished jobs`,
  250,
).catch(() => {
  timedOut = true;
});
const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
const jobs = await queue.getJobs(['completed', 'failed'], 0, -1);
const summary = {
  jobs: jobs.length,
  startedMoreThanOnce: 0,
  attemptsMadeNotOne: 0,
  byAuditWorker: { inserted: 0, duplicate: 0 },
  byNode: 0,
  other: [],
  failedReasons: [],
};
const keys = new Set();
const nodeIds = [];
for (const job of jobs) {
  if (job.attemptsStarted > 1) summary.startedMoreThanOnce += 1;
  if (job.attemptsMade !== 1) summary.attemptsMadeNotOne += 1;
  if (job.failedReason) summary.failedReasons.push(job.failedReason);
  const rv = job.returnvalue;
  if (rv && rv.processedBy === 'node') {
    summary.byNode += 1;
    nodeIds.push(job.id);
  } else if (rv && typeof rv.idempotencyKey === 'string' && rv.stored in summary.byAuditWorker) {
    summary.byAuditWorker[rv.stored] += 1;
    keys.add(rv.idempotencyKey);
  } else if (!job.failedReason && summary.other.length < 5) {
    summary.other.push({ id: job.id, returnvalue: rv });
  }
}
summary.failedReasons = summary.failedReasons.slice(0, 5);
emit({ timedOut, counts, distinctKeys: keys.size, nodeIds, ...summary });
await queue.close();
