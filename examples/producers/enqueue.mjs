#!/usr/bin/env node
// Enqueue one conveyor job from Node with node-redis (a raw producer).
//
//   npm install redis            # in this directory (package.json), v4 or v5
//   node enqueue.mjs [--redis-url URL] [--prefix P] [--queue Q] [--id ID]
//                    [--delay SECONDS] TYPE [PAYLOAD]
//
// Prints the job id. Exit 0 when Redis accepted the job, 2 for a usage
// error, 1 for anything else.
//
// What it does (the key layout of docs/reference/redis-keys.md):
//   now:      LPUSH P:{Q}:pending '{"id": ..., "type": ..., "payload": ...}'
//   --delay:  ZADD  P:{Q}:scheduled <due Unix ms> '<the same JSON>'
// The due time is Redis' TIME plus the delay, the clock the daemons promote
// by, so this host's clock does not matter.
//
// A raw push skips the "a live job id is not enqueued twice" check: only
// `conveyor enqueue` refuses an id that is already pending, scheduled or
// running. Give each job its own id (the default) or go through the CLI.
//
// The commands go through sendCommand, which node-redis v4 and v5 both have
// (their typed helpers differ, TIME's reply for one).

import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";

const USAGE =
  "usage: enqueue.mjs [--redis-url URL] [--prefix P] [--queue Q] [--id ID] [--delay SECONDS] TYPE [PAYLOAD]";

function usageError(message) {
  console.error(`enqueue.mjs: ${message}`);
  console.error(USAGE);
  process.exit(2);
}

function hasSpaceOrControl(s) {
  return /[\s\p{Cc}]/u.test(s);
}

function parse(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        "redis-url": { type: "string" },
        prefix: { type: "string" },
        queue: { type: "string", default: "default" },
        id: { type: "string" },
        delay: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    usageError(e.message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (positionals.length < 1) usageError("missing TYPE");
  if (positionals.length > 2) usageError("too many arguments (quote the PAYLOAD as one argument)");
  const [type, payloadText = "null"] = positionals;
  if (!type || /\p{Cc}/u.test(type)) usageError("TYPE must not be empty or contain control characters");

  let payload;
  try {
    payload = JSON.parse(payloadText);
  } catch (e) {
    usageError(`PAYLOAD is not valid JSON: ${e.message}`);
  }

  const id = values.id ?? randomUUID();
  if (!id || hasSpaceOrControl(id)) usageError("the id must not be empty or contain spaces or control characters");

  const prefix = values.prefix ?? (process.env.CONVEYOR_PREFIX || "conveyor");
  if (!prefix) usageError("the prefix must not be empty");
  const queue = values.queue;
  if (!queue || /[{}]/.test(queue) || hasSpaceOrControl(queue)) usageError(`bad queue name '${queue}'`);

  let delayMs = null;
  if (values.delay !== undefined) {
    const secs = values.delay.trim() === "" ? NaN : Number(values.delay);
    if (!Number.isFinite(secs) || secs < 0) usageError(`--delay takes seconds >= 0, not '${values.delay}'`);
    delayMs = Math.round(secs * 1000);
  }

  const url =
    values["redis-url"] ?? (process.env.REDIS_URL || process.env.CONVEYOR_REDIS_URL || "redis://127.0.0.1:6379");
  return { url, prefix, queue, id, type, payload, delayMs };
}

async function main() {
  const opts = parse(process.argv.slice(2));

  let createClient;
  try {
    ({ createClient } = await import("redis"));
  } catch {
    console.error("enqueue.mjs: needs node-redis: npm install redis (in this directory)");
    process.exit(1);
  }

  const job = { id: opts.id, type: opts.type, payload: opts.payload };
  const body = JSON.stringify(job);
  // The braces are a Redis Cluster hash tag: all keys of one queue in one slot.
  const key = (kind) => `${opts.prefix}:{${opts.queue}}:${kind}`;

  // No reconnection loop: a producer that cannot reach Redis should say so.
  const client = createClient({
    url: opts.url,
    socket: { connectTimeout: 10_000, reconnectStrategy: false },
  });
  let connectionError = null;
  client.on("error", (e) => {
    connectionError = e;
  });
  try {
    await client.connect();
    if (opts.delayMs === null) {
      await client.sendCommand(["LPUSH", key("pending"), body]);
    } else {
      const [secs, micros] = await client.sendCommand(["TIME"]); // the Redis server's clock
      const dueMs = Number(secs) * 1000 + Math.floor(Number(micros) / 1000) + opts.delayMs;
      await client.sendCommand(["ZADD", key("scheduled"), String(dueMs), body]);
    }
  } catch (e) {
    console.error(`enqueue.mjs: ${e.message || connectionError?.message || e}`);
    process.exitCode = 1;
    return;
  } finally {
    if (client.isOpen) await client.quit().catch(() => {});
  }
  console.log(opts.id);
}

await main();
