// A nats.js request that carries a W3C traceparent header (as any traced Node.js service
// would send it), so the test can check that toolbus joins that trace.
//
// Usage: node traceparent.mjs NATS_URL TRAJECTORY_ID TRACEPARENT
// Prints one JSON line: the reply's success and whether the reply echoed trace headers.

import { connect, headers } from "nats";

const [url, trajectoryId, traceparent] = process.argv.slice(2);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

const nc = await connect({ servers: url, name: "toolbus-node-traceparent" });
try {
  const sent = headers();
  sent.set("TraceParent", traceparent); // header names are case-insensitive in W3C: mixed case
  const body = {
    trajectory_id: trajectoryId,
    tool: { name: "terminal", arguments: { command: "echo traced-from-node" } },
  };
  let msg;
  for (let attempt = 0; ; attempt++) {
    try {
      msg = await nc.request("tools.execute.terminal", encoder.encode(JSON.stringify(body)), {
        timeout: 15000,
        headers: sent,
      });
      break;
    } catch (err) {
      if (attempt >= 3) throw err; // no responders for a moment after start (nats-server#2876)
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
  const reply = JSON.parse(decoder.decode(msg.data));
  const echoed = [...(msg.headers?.keys() ?? [])].filter((key) =>
    ["traceparent", "tracestate"].includes(key.toLowerCase()),
  );
  console.log(JSON.stringify({ success: reply.success, output: reply.output, echoed }));
} finally {
  await nc.close();
}
