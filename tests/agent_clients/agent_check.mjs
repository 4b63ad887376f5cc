// Drives two unchanged seed Node (eventsource + fetch) agent clients through `tunnel signal`:
// join, roster, signal delivery, leave. Usage: node agent_check.mjs http://127.0.0.1:PORT
import NodeAgentClient from './seed_client.mjs';

const url = process.argv[2];
const until = async (cond, what, ms = 10000) => {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) { console.error(`timed out waiting for ${what}`); process.exit(1); }
    await new Promise((r) => setTimeout(r, 20));
  }
};

const a = new NodeAgentClient(url, 'node-agents');
const b = new NodeAgentClient(url, 'node-agents');
const received = [];
b.onSignal = (sender, signal) => received.push({ sender, signal });
a.connect();
b.connect();
await until(() => a.clientId && b.clientId && a.roster.length === 2, 'both joined');
await a.sendSignal(b.clientId, { type: 'agent-ping', message: 'hello from node' });
await until(() => received.length > 0, 'the signal');
if (received[0].sender !== a.clientId || received[0].signal.message !== 'hello from node') {
  console.error('wrong signal', JSON.stringify(received));
  process.exit(1);
}
await b.leave();
await until(() => a.roster.length === 1 && a.roster[0] === a.clientId, 'the roster after leave');
await a.leave();
console.log('node agent client: ok');
process.exit(0);
