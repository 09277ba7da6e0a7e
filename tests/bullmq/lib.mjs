// Shared helpers of the Node side of the BullMQ compatibility tests: the
// Redis connection and queue names from the environment, events built as
// the smart-logs audit SDK builds them, and one-JSON-line output that the
// Rust tests (tests/it/bullmq.rs) parse.
import { createHash, createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Job } from 'bullmq';

/** Settings from the environment: the Rust test sets them per test. */
export const env = {
  redisUrl: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
  queue: required('QUEUE'),
  prefix: process.env.PREFIX ?? 'bull',
  timeoutMs: Number(process.env.TIMEOUT_MS ?? 120000),
};

function required(name) {
  const v = process.env[name];
  if (!v) {
    fail(`environment variable ${name} is required`);
  }
  return v;
}

/** Prints one JSON line on stdout (the Rust side reads line by line). */
export function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

/** Reports a broken precondition and exits non-zero. */
export function fail(message) {
  process.stderr.write(`bullmq test script: ${message}\n`);
  process.exit(1);
}

/** Options shared by Queue, QueueEvents and Worker. */
export function queueOptions(extra = {}) {
  return { connection: { url: env.redisUrl }, prefix: env.prefix, ...extra };
}

/** A promise that rejects after `ms`, naming what it waited for. */
export function deadline(ms, what) {
  return new Promise((_, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    t.unref();
  });
}

// --- Events as the smart-logs SDK builds them -----------------------------

/** The fields canonical hash v1 covers (README, "Storage"). */
const CRITICAL_FIELDS = [
  'timestamp',
  'action',
  'status',
  'principalId',
  'organizationId',
  'targetResourceType',
  'targetResourceId',
  'outcomeDescription',
];

/**
 * Canonical hash v1, written the way the smart-logs SDK computes it: the
 * eight fields (missing or empty -> null), names sorted, `name:` +
 * JSON.stringify(value), joined with `|`, SHA-256, lowercase hex.
 */
export function canonicalHashV1(event) {
  const critical = {};
  for (const field of CRITICAL_FIELDS) {
    const value = event[field];
    critical[field] = value === undefined || value === null || value === '' ? null : value;
  }
  const canonical = Object.keys(critical)
    .sort()
    .map((k) => `${k}:${JSON.stringify(critical[k])}`)
    .join('|');
  return createHash('sha256').update(canonical, 'utf8').digest('hex');
}

/** HMAC-SHA256 over the hex hash string, lowercase hex (smart-logs' signature). */
export function signHash(hash, secret) {
  return createHmac('sha256', secret).update(hash, 'utf8').digest('hex');
}

/**
 * Checks this file against the shared known-answer vectors (computed with
 * smart-logs' own code), so a test can only pass with the producer's real
 * algorithm.
 */
export function checkAgainstVectors() {
  const url = new URL('../fixtures/integrity-vectors.json', import.meta.url);
  const vectors = JSON.parse(readFileSync(url, 'utf8'));
  for (const c of vectors.canonicalHashV1) {
    const hash = canonicalHashV1(c.event);
    if (hash !== c.hash) fail(`canonical hash ${hash} differs from the vector ${c.hash}`);
    const sig = signHash(hash, c.hmacKey);
    if (sig !== c.signature) fail(`signature ${sig} differs from the vector ${c.signature}`);
  }
  return vectors.canonicalHashV1.length;
}

/**
 * An audit event as smart-logs' `Audit.log(details, {generateHash: true,
 * generateSignature: true})` emits it: ISO timestamp, the details, the
 * hash with its algorithm, and the HMAC signature with its algorithm.
 */
export function smartLogsEvent(i, secret) {
  const event = {
    timestamp: new Date(Date.now() - (i % 3600) * 1000).toISOString(),
    action: `fhir.patient.read.${i % 7}`,
    status: ['attempt', 'success', 'failure'][i % 3],
    principalId: `practitioner-${i % 50}`,
    organizationId: `org-${i % 5}`,
    targetResourceType: 'Patient',
    targetResourceId: `patient-${i}`,
    outcomeDescription: `Zoë read "chart" ${i} — 日本語`,
    dataClassification: 'PHI',
    retentionPolicy: 'hipaa-6-years',
    correlationId: `corr-${i}`,
    eventVersion: '1.0',
    sessionContext: {
      sessionId: `sess-${i}`,
      ipAddress: '10.1.2.3',
      userAgent: 'smart-logs-test/1.0',
    },
    hashAlgorithm: 'SHA-256',
  };
  event.hash = canonicalHashV1(event);
  event.signature = signHash(event.hash, secret);
  event.algorithm = 'HMAC-SHA256';
  return event;
}

/** A plain valid event (no hash: the worker computes it). */
export function plainEvent(i, { anonymous = false, tag = 'e' } = {}) {
  const event = {
    timestamp: new Date(Date.now() - (i % 3600) * 1000).toISOString(),
    action: `record.read.${i % 7}`,
    status: ['attempt', 'success', 'failure'][i % 3],
    principalId: `user-${i % 100}`,
    organizationId: `org-${i % 5}`,
    targetResourceType: 'Patient',
    targetResourceId: `p-${i}`,
    outcomeDescription: `read ${i}`,
    sessionContext: { sessionId: `s-${i}`, ipAddress: '10.0.0.1', userAgent: 'node-test' },
    customField: { nested: { value: i } },
  };
  if (!anonymous) event.eventId = `${tag}-${env.queue}-${i}`;
  return event;
}

/** Waits until `pred()` is true, polling every `everyMs`. */
export async function pollUntil(pred, timeoutMs, what, everyMs = 100) {
  const started = Date.now();
  for (;;) {
    if (await pred()) return;
    if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/**
 * Waits until job `id` of `queue` is completed or failed, polling its state
 * (a QueueEvents subscription can miss a job that finishes before its first
 * read of the events stream), and returns what Node sees of it: state,
 * attemptsMade, failedReason and the return value, parsed when it is JSON.
 */
export async function waitFinished(queue, id) {
  let state;
  await pollUntil(
    async () => {
      state = await queue.getJobState(id);
      return state === 'completed' || state === 'failed';
    },
    env.timeoutMs,
    `job ${id} to finish`,
  );
  const j = await Job.fromId(queue, id);
  let returnvalue = j.returnvalue ?? null;
  if (typeof returnvalue === 'string') {
    try {
      returnvalue = JSON.parse(returnvalue);
    } catch {
      // left as the raw string
    }
  }
  return { state, attemptsMade: j.attemptsMade, failedReason: j.failedReason ?? null, returnvalue };
}
