// Cross-language check of the toolbus wire contract: plain NATS requests from nats.js.
//
// Usage: node client.mjs [NATS_URL] [TRAJECTORY_ID]
//   (or the environment variables NATS_URL and TOOLBUS_TRAJECTORY_ID)
//
// Prints one JSON line summarizing what was checked and exits 0; on any mismatch prints
// "FAIL: ..." to stderr and exits 1. Only the public contract is used (schemas/messages.py,
// schemas/errors.py, schemas/subjects.py): no toolbus client library.

import { createHash } from "node:crypto";
import { connect, ErrorCode } from "nats";

const url = process.argv[2] || process.env.NATS_URL;
const trajectoryId = process.argv[3] || process.env.TOOLBUS_TRAJECTORY_ID;
const REQUEST_TIMEOUT_MS = 15000;
const NO_RESPONDERS_RETRIES = 3;
const RETRY_SLEEP_MS = 250;

const ERROR_HEADER = "Nats-Service-Error";
const ERROR_CODE_HEADER = "Nats-Service-Error-Code";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

class CheckFailed extends Error {}

function check(condition, message) {
  if (!condition) {
    throw new CheckFailed(message);
  }
}

function show(value) {
  return JSON.stringify(value);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// nats-server may answer "no responders" for a moment after a subscription appears
// (nats-server#2876): retry that error, and only that one, a few times.
async function request(nc, subject, body) {
  const payload = encoder.encode(JSON.stringify(body));
  for (let attempt = 0; ; attempt++) {
    try {
      return await nc.request(subject, payload, { timeout: REQUEST_TIMEOUT_MS });
    } catch (err) {
      if (err?.code === ErrorCode.NoResponders && attempt < NO_RESPONDERS_RETRIES) {
        await sleep(RETRY_SLEEP_MS);
        continue;
      }
      const reason =
        err?.code === ErrorCode.NoResponders
          ? "no responders (503): no toolbus executor is subscribed"
          : `${err?.message ?? err} (code ${err?.code})`;
      throw new CheckFailed(`request to ${subject} failed after ${attempt + 1} tries: ${reason}`);
    }
  }
}

function parseJson(msg, subject) {
  const text = decoder.decode(msg.data);
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new CheckFailed(`reply of ${subject} is not JSON: ${show(text)} (${err.message})`);
  }
}

// A successful reply must not carry the ADR-32 error headers.
function expectNoErrorHeaders(msg, subject) {
  const code = msg.headers?.get(ERROR_CODE_HEADER);
  check(
    !code,
    `reply of ${subject} is an error: ${ERROR_CODE_HEADER}=${show(code)} ` +
      `${ERROR_HEADER}=${show(msg.headers?.get(ERROR_HEADER))} body=${decoder.decode(msg.data)}`,
  );
}

async function call(nc, subject, body) {
  const msg = await request(nc, subject, body);
  expectNoErrorHeaders(msg, subject);
  return parseJson(msg, subject);
}

async function checkTerminal(nc) {
  const subject = "tools.execute.terminal";
  const reply = await call(nc, subject, {
    trajectory_id: trajectoryId,
    tool: {
      name: "terminal",
      arguments: { command: "echo hello-from-node && pwd" },
      uniq_id: "node-1",
    },
  });
  check(reply.success === true, `terminal: success is not true: ${show(reply)}`);
  check(
    typeof reply.output === "string" && reply.output.startsWith("hello-from-node\n"),
    `terminal: output does not start with "hello-from-node\\n": ${show(reply.output)}`,
  );
  check(reply.uniq_id === "node-1", `terminal: uniq_id is ${show(reply.uniq_id)}, not "node-1"`);
  check(
    reply.metadata?.exit_code === 0,
    `terminal: metadata.exit_code is ${show(reply.metadata?.exit_code)}, not 0`,
  );
  return { output: reply.output, worker_id: reply.metadata?.worker_id ?? null };
}

async function checkWriteRead(nc) {
  const path = "node/round-trip.txt";
  const content = "written by nats.js\nünïcødé ✓ \"quotes\" \\ back\\slash\n\ttab\n";
  const wrote = await call(nc, "tools.execute.write_file", {
    trajectory_id: trajectoryId,
    tool: { name: "write_file", arguments: { path, content }, uniq_id: "node-2" },
  });
  check(wrote.success === true, `write_file: success is not true: ${show(wrote)}`);
  check(wrote.uniq_id === "node-2", `write_file: uniq_id is ${show(wrote.uniq_id)}`);

  const read = await call(nc, "tools.execute.read_file", {
    trajectory_id: trajectoryId,
    tool: { name: "read_file", arguments: { path }, uniq_id: "node-3" },
  });
  check(read.success === true, `read_file: success is not true: ${show(read)}`);
  check(
    read.output === content,
    `read_file: output ${show(read.output)} differs from what was written ${show(content)}`,
  );
  return { path, bytes: encoder.encode(content).length };
}

// Archive part of the workspace through toolbus, then fetch the archive with nats.js's own
// Object Store API and check its size and SHA-256 against the reference in the reply.
async function checkArchiveFetch(nc) {
  const made = await call(nc, "tools.execute.terminal", {
    trajectory_id: trajectoryId,
    tool: {
      name: "terminal",
      arguments: {
        command:
          "mkdir -p node/deep/er node/empty && head -c 300000 /dev/urandom > node/deep/er/blob.bin" +
          " && echo hi > node/deep/hi.txt",
      },
    },
  });
  check(made.success === true, `archive setup: ${show(made)}`);
  const listed = await call(nc, "tools.artifacts.list", {
    trajectory_id: trajectoryId,
    path: "node",
    recursive: true,
  });
  check(listed.success === true, `artifacts.list: ${show(listed)}`);
  const paths = listed.entries.map((entry) => entry.path);
  check(paths.includes("node/deep/er/blob.bin"), `artifacts.list: no blob.bin in ${show(paths)}`);

  const reply = await call(nc, "tools.artifacts.archive", {
    trajectory_id: trajectoryId,
    path: "node",
    format: "tar.gz",
  });
  check(reply.success === true, `artifacts.archive: ${show(reply)}`);
  const ref = reply.object;
  check(ref && ref.bucket && ref.name, `artifacts.archive: no object reference: ${show(reply)}`);

  const store = await nc.jetstream().views.os(ref.bucket);
  const result = await store.get(ref.name);
  check(result !== null, `object store: no object ${show(ref.name)} in ${show(ref.bucket)}`);
  const hash = createHash("sha256");
  let size = 0;
  for await (const chunk of result.data) {
    hash.update(chunk);
    size += chunk.length;
  }
  const failure = await result.error;
  check(!failure, `object store: reading ${show(ref.name)} failed: ${failure}`);
  const sha256 = hash.digest("hex");
  check(size === ref.size, `object store: ${size} bytes, the reply said ${ref.size}`);
  check(sha256 === ref.sha256, `object store: sha256 ${sha256}, the reply said ${ref.sha256}`);
  return { ...ref, fetched_sha256: sha256, entry_count: reply.entry_count, listed: paths.length };
}

async function checkUnknownTool(nc) {
  const subject = "tools.execute.no_such_tool";
  const msg = await request(nc, subject, {
    trajectory_id: trajectoryId,
    tool: { name: "no_such_tool" },
  });
  check(msg.headers, `${subject}: reply has no headers: ${decoder.decode(msg.data)}`);
  const code = msg.headers.get(ERROR_CODE_HEADER);
  const description = msg.headers.get(ERROR_HEADER);
  check(code === "404", `${subject}: ${ERROR_CODE_HEADER} is ${show(code)}, not "404"`);
  check(
    description.includes("Unknown tool: no_such_tool"),
    `${subject}: ${ERROR_HEADER} is ${show(description)}`,
  );
  const body = parseJson(msg, subject);
  check(body.code === 404, `${subject}: body.code is ${show(body.code)}, not 404`);
  check(body.error === "unknown_tool", `${subject}: body.error is ${show(body.error)}`);
  check(
    typeof body.message === "string" && body.message.includes("Unknown tool: no_such_tool"),
    `${subject}: body.message is ${show(body.message)}`,
  );
  return { code: body.code, error: body.error, header: description };
}

async function checkRelease(nc) {
  const reply = await call(nc, "tools.release", {
    trajectory_id: trajectoryId,
    reset_workspace: true,
  });
  check(reply.status === "ok", `release: status is not "ok": ${show(reply)}`);
  return { status: reply.status, slot: reply.slot ?? null };
}

async function checkPing(nc) {
  const subject = "$SRV.PING.toolbus";
  const reply = await call(nc, subject, {});
  check(
    reply.type === "io.nats.micro.v1.ping_response",
    `${subject}: type is ${show(reply.type)}`,
  );
  check(reply.name === "toolbus", `${subject}: name is ${show(reply.name)}, not "toolbus"`);
  return { type: reply.type, name: reply.name, id: reply.id ?? null };
}

async function main() {
  if (!url || !trajectoryId) {
    throw new CheckFailed("usage: node client.mjs NATS_URL TRAJECTORY_ID");
  }
  let nc;
  try {
    nc = await connect({ servers: url, name: "toolbus-node-client" });
  } catch (err) {
    throw new CheckFailed(`cannot connect to ${url}: ${err?.message ?? err}`);
  }
  try {
    const summary = { ok: true, nats: "nats.js", trajectory_id: trajectoryId, checks: {} };
    summary.checks.terminal = await checkTerminal(nc);
    summary.checks.write_read = await checkWriteRead(nc);
    summary.checks.archive_fetch = await checkArchiveFetch(nc);
    summary.checks.unknown_tool = await checkUnknownTool(nc);
    summary.checks.release = await checkRelease(nc);
    summary.checks.ping = await checkPing(nc);
    console.log(JSON.stringify(summary));
  } finally {
    await nc.close();
  }
}

try {
  await main();
  process.exitCode = 0;
} catch (err) {
  const detail = err instanceof CheckFailed ? err.message : err?.stack ?? String(err);
  console.error(`FAIL: ${detail}`);
  process.exitCode = 1;
}
