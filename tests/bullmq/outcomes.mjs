// Adds a small set of labelled jobs (SCENARIO), waits until QueueEvents
// reports each finished, and prints per job what Node sees: state,
// attemptsMade, failedReason, parsed return value.
//
//   SCENARIO=wrong-hash  an event whose hash is wrong, with attempts: 5
//                        (and a valid control job, a snapshot request
//                        and data that is not an event object)
//   SCENARIO=smart-logs  events built as the smart-logs SDK builds them
//                        (canonical hash v1 + HMAC, key HMAC_SECRET), and
//                        copies with one thing altered after signing
//   SCENARIO=hostile     the jobs listed in the JSON file HOSTILE_FILE:
//                        [{label, name?, json}] added as Node adds them
//                        (JSON.parse, then Queue.add), [{label, name?, hex}]
//                        added with a placeholder whose stored data is then
//                        overwritten with exactly those bytes, as a producer
//                        bypassing JSON.stringify would; the queue is paused
//                        meanwhile so no worker sees a placeholder
import { readFileSync } from 'node:fs';
import { Job, Queue, QueueEvents } from 'bullmq';
import IORedis from 'ioredis';
import {
  env,
  emit,
  fail,
  queueOptions,
  plainEvent,
  smartLogsEvent,
  canonicalHashV1,
  checkAgainstVectors,
  deadline,
} from './lib.mjs';

const scenario = process.env.SCENARIO;
const retryOpts = { attempts: 5, backoff: { type: 'fixed', delay: 100 } };

function wrongHash() {
  const bad = plainEvent(1, { tag: 'wronghash' });
  bad.hash = canonicalHashV1({ ...bad, action: 'something.else' });
  bad.hashAlgorithm = 'SHA-256';
  const good = plainEvent(2, { tag: 'wronghash' });
  good.hash = canonicalHashV1(good);
  return [
    { label: 'wrong-hash', name: 'audit.event', data: bad, opts: retryOpts },
    { label: 'control', name: 'audit.event', data: good, opts: retryOpts },
    // Kinds of later issues: without their handler, unknown_kind at once.
    { label: 'unknown-kind', name: 'audit.snapshot', data: { upTo: 'now' }, opts: retryOpts },
    // Valid JSON, but not an event object.
    { label: 'not-an-object', name: 'audit.event', data: 'just a string', opts: retryOpts },
  ];
}

function smartLogs() {
  const secret = process.env.HMAC_SECRET ?? fail('HMAC_SECRET is required');
  const vectors = checkAgainstVectors();
  const jobs = [];
  const n = Number(process.env.COUNT ?? 20);
  for (let i = 0; i < n; i += 1) {
    jobs.push({ label: 'genuine', name: 'audit.event', data: smartLogsEvent(i, secret), opts: retryOpts });
  }
  const alter = (i, label, change) => {
    const e = smartLogsEvent(1000 + i, secret);
    change(e);
    jobs.push({ label, name: 'audit.event', data: e, opts: retryOpts });
  };
  alter(0, 'altered-action', (e) => (e.action = 'fhir.patient.delete'));
  alter(1, 'altered-outcome', (e) => (e.outcomeDescription += '!'));
  alter(2, 'altered-principal', (e) => (e.principalId = 'someone-else'));
  alter(3, 'altered-timestamp', (e) => (e.timestamp = new Date(Date.parse(e.timestamp) - 1000).toISOString()));
  // Altered, and the hash recomputed by someone without the key.
  alter(4, 'rehashed-unsigned', (e) => {
    e.status = 'success';
    e.targetResourceId = 'patient-other';
    e.hash = canonicalHashV1(e);
  });
  alter(5, 'altered-signature', (e) => (e.signature = e.signature.replace(/^./, (c) => (c === '0' ? '1' : '0'))));
  // A field outside the hash may change freely: still genuine.
  alter(6, 'genuine-other-field', (e) => (e.dataClassification = 'INTERNAL'));
  return { jobs, vectors };
}

function hostile() {
  const file = process.env.HOSTILE_FILE ?? fail('HOSTILE_FILE is required');
  return JSON.parse(readFileSync(file, 'utf8')).map((c) => ({
    label: c.label,
    name: c.name ?? 'audit.event',
    data: c.json !== undefined ? JSON.parse(c.json) : { placeholder: true },
    raw: c.hex !== undefined ? Buffer.from(c.hex, 'hex') : null,
    opts: retryOpts,
  }));
}

let jobs;
let extra = {};
if (scenario === 'wrong-hash') {
  jobs = wrongHash();
} else if (scenario === 'smart-logs') {
  const s = smartLogs();
  jobs = s.jobs;
  extra = { vectorsChecked: s.vectors };
} else if (scenario === 'hostile') {
  jobs = hostile();
} else {
  fail(`unknown SCENARIO ${scenario}`);
}

const queue = new Queue(env.queue, queueOptions());
// From the start of this queue's (fresh) event stream: a QueueEvents that
// started reading at '$' could miss a job that finished before its first read.
const events = new QueueEvents(env.queue, queueOptions({ lastEventId: '0-0' }));
await events.waitUntilReady();
await queue.waitUntilReady();

const finished = new Map();
// Filled once the jobs are added; events may arrive before that.
let ids = new Set();
let resolveDone;
const done = new Promise((r) => (resolveDone = r));
const seen = { completed: 0, failed: 0 };
const record = (kind) => ({ jobId }) => {
  seen[kind] += 1;
  finished.set(jobId, kind);
  if (ids.size > 0 && [...ids].every((id) => finished.has(id))) resolveDone();
};
events.on('completed', record('completed'));
events.on('failed', record('failed'));

const rawData = jobs.some((j) => j.raw);
if (rawData) {
  await queue.pause();
}
const added = await queue.addBulk(jobs.map(({ name, data, opts }) => ({ name, data, opts })));
ids = new Set(added.map((j) => j.id));
// The data each job holds in Redis when workers may take it.
const stored = new Map();
const client = new IORedis(env.redisUrl);
for (let k = 0; k < added.length; k += 1) {
  const key = queue.toKey(added[k].id);
  if (jobs[k].raw) {
    await client.hset(key, 'data', jobs[k].raw);
  }
  stored.set(added[k].id, (await client.hgetBuffer(key, 'data')).toString('hex'));
}
if (rawData) {
  await queue.resume();
}
if ([...ids].every((id) => finished.has(id))) resolveDone();
let timedOut = false;
await Promise.race([done, deadline(env.timeoutMs, 'every job to finish')]).catch(() => {
  timedOut = true;
});

// What Node sees of each job. Job.fromId parses the job's data and throws
// on data that is not JSON (the raw hostile cases): those are read from the
// job's hash directly, field by field as Job.fromJSON would.
const jobView = async (id) => {
  try {
    const job = await Job.fromId(queue, id);
    return {
      attemptsMade: job.attemptsMade,
      attemptsStarted: job.attemptsStarted,
      failedReason: job.failedReason,
      returnvalue: job.returnvalue,
    };
  } catch {
    const h = await client.hgetall(queue.toKey(id));
    return {
      attemptsMade: Number(h.atm ?? 0),
      attemptsStarted: Number(h.ats ?? 0),
      failedReason: h.failedReason,
      returnvalue: h.returnvalue,
    };
  }
};
const out = [];
for (let k = 0; k < added.length; k += 1) {
  const id = added[k].id;
  const job = await jobView(id);
  const state = await queue.getJobState(id);
  let returnvalue = job.returnvalue;
  if (typeof returnvalue === 'string') {
    try {
      returnvalue = JSON.parse(returnvalue);
    } catch {
      // left as the raw string: the Rust side asserts on its shape
    }
  }
  out.push({
    label: jobs[k].label,
    id,
    event: finished.get(id) ?? null,
    state,
    attemptsMade: job.attemptsMade,
    attemptsStarted: job.attemptsStarted,
    failedReason: job.failedReason ?? null,
    returnvalue: returnvalue ?? null,
    storedHex: stored.get(id),
  });
}
emit({ jobs: out, timedOut, ...extra });
await client.quit();
await events.close();
await queue.close();
