// Adds one job NAME (default gdpr.erase) with the JSON data DATA, waits
// until it finishes, then has BullMQ deliver it a second time (Job.retry of
// the finished job: the same job id processed again, as after an
// acknowledgement lost with its worker) and waits again. Prints what Node
// sees of both runs: state, attemptsMade, failedReason, return value.
import { Job, Queue } from 'bullmq';
import { env, emit, fail, queueOptions, waitFinished } from './lib.mjs';

const data = JSON.parse(process.env.DATA ?? fail('DATA is required'));
const name = process.env.NAME ?? 'gdpr.erase';
const queue = new Queue(env.queue, queueOptions());
await queue.waitUntilReady();
const job = await queue.add(name, data, { attempts: 5, backoff: { type: 'fixed', delay: 200 } });

const first = await waitFinished(queue, job.id);
await (await Job.fromId(queue, job.id)).retry(first.state);
const second = await waitFinished(queue, job.id);
emit({ id: job.id, first, second });
await queue.close();
