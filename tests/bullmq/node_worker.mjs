// A plain Node BullMQ Worker on the same queue.
//
//   MODE=record  returns {"processedBy":"node"} for each job and, on
//                SIGTERM, prints the ids it processed and how many times.
//   MODE=noop    the benchmark's do-nothing worker: returns null, and
//                when STOP_AFTER jobs have completed prints the rate from
//                its first job to its last and exits.
import { Worker } from 'bullmq';
import { env, emit, queueOptions } from './lib.mjs';

const mode = process.env.MODE ?? 'record';
const concurrency = Number(process.env.CONCURRENCY ?? 100);
const stopAfter = Number(process.env.STOP_AFTER ?? 0);
const seen = new Map();
let completed = 0;
let firstAt = null;

const worker = new Worker(
  env.queue,
  async (job) => {
    firstAt ??= process.hrtime.bigint();
    if (mode === 'noop') return null;
    seen.set(job.id, (seen.get(job.id) ?? 0) + 1);
    // Hold the job a moment, as a real processor would, so both workers
    // have jobs in flight at the same time.
    await new Promise((r) => setTimeout(r, 2));
    return { processedBy: 'node' };
  },
  queueOptions({ concurrency }),
);
await worker.waitUntilReady();
emit({ phase: 'ready' });

worker.on('completed', async () => {
  completed += 1;
  if (stopAfter > 0 && completed === stopAfter) {
    const seconds = Number(process.hrtime.bigint() - firstAt) / 1e9;
    emit({ phase: 'done', completed, seconds, jobsPerSecond: completed / seconds });
    await worker.close();
    process.exit(0);
  }
});

process.on('SIGTERM', async () => {
  await worker.close();
  emit({
    phase: 'stopped',
    processed: [...seen.keys()],
    processedTwice: [...seen.values()].filter((n) => n > 1).length,
    completed,
  });
  process.exit(0);
});
