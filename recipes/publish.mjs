import { connect, headers } from 'nats';

const nc = await connect({ servers: process.env.NATS_URL });
const h = headers();
h.set('Sse-Event', 'order.shipped');
// Resolves once JetStream stored it; `seq` is the event's SSE id.
const ack = await nc.jetstream().publish('events.orders.42', '{"status":"shipped"}', { headers: h });
console.log(ack.seq);
await nc.close();
