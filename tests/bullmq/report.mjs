// Adds one `report.compliance` job whose data is the JSON in REPORT, waits
// until BullMQ reports it finished, and prints its id, state and return
// value (audit-worker answers {"jobId", "status", "deduplicated"}).
import { Queue, QueueEvents } from 'bullmq';
import { env, emit, fail, queueOptions } from './lib.mjs';

const raw = process.env.REPORT;
if (!raw) fail('environment variable REPORT is required');
const queue = new Queue(env.queue, queueOptions());
const events = new QueueEvents(env.queue, queueOptions());
await events.waitUntilReady();
const job = await queue.add('report.compliance', JSON.parse(raw));
let returnvalue = null;
let failedReason = null;
try {
  returnvalue = await job.waitUntilFinished(events, env.timeoutMs);
} catch (e) {
  failedReason = String(e.message ?? e);
}
emit({ id: job.id, state: await job.getState(), returnvalue, failedReason });
await events.close();
await queue.close();
