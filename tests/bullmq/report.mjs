// Adds one `report.compliance` job whose data is the JSON in REPORT, waits
// until BullMQ reports it finished, and prints its id, state, failed reason
// and return value (audit-worker answers {"jobId", "status", "deduplicated"}).
import { Queue } from 'bullmq';
import { env, emit, fail, queueOptions, waitFinished } from './lib.mjs';

const raw = process.env.REPORT;
if (!raw) fail('environment variable REPORT is required');
const queue = new Queue(env.queue, queueOptions());
await queue.waitUntilReady();
const job = await queue.add('report.compliance', JSON.parse(raw));
const { state, returnvalue, failedReason } = await waitFinished(queue, job.id);
emit({ id: job.id, state, returnvalue, failedReason });
await queue.close();
