// Prints the queue's job counts by state, as Node's Queue.getJobCounts sees them.
import { Queue } from 'bullmq';
import { env, emit, queueOptions } from './lib.mjs';

const queue = new Queue(env.queue, queueOptions());
emit(await queue.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed'));
await queue.close();
