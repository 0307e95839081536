// Sends a user's calls to Pulse through Segment's official Node SDK (@segment/analytics-node,
// unchanged, which batches them to /v1/batch with the key in Basic auth) and prints, as one
// JSON object on stdout, the message id the SDK gave each call and every HTTP answer it got.
//
//   node tests/sdk/node.cjs <ingest url> <write key> <user id>
'use strict';

const { Analytics } = require('@segment/analytics-node');

const [host, writeKey, userId] = process.argv.slice(2);
if (!host || !writeKey || !userId) {
  console.error('usage: node.cjs <ingest url> <write key> <user id>');
  process.exit(2);
}

async function main() {
  // flushAt above the number of calls: they leave in one batch, at closeAndFlush.
  const analytics = new Analytics({ writeKey, host, flushAt: 50, flushInterval: 10_000 });
  const answers = [];
  const errors = [];
  analytics.on('http_request', (r) => answers.push({ url: r.url, method: r.method }));
  analytics.on('error', (e) => errors.push(String(e && (e.message || e.code || e))));

  const calls = [];
  const call = (name, fn, params) =>
    calls.push(
      new Promise((resolve) =>
        fn.call(analytics, params, (err, ctx) =>
          resolve({ name, messageId: ctx && ctx.event.messageId, error: err ? String(err) : null })
        )
      )
    );
  call('identify', analytics.identify, { userId, traits: { gender: 'male', email: `${userId}@example.com` } });
  call('page', analytics.page, { userId, name: 'Checkout', properties: { url: 'https://shop.example/checkout' } });
  call('track', analytics.track, {
    userId,
    event: 'Product Added',
    properties: { product_id: 'sku-42', price: '19.99', quantity: 3, category: ['Shoes', 'Sale'] },
  });
  call('track', analytics.track, { userId, event: 'Order Completed', properties: { order_id: 'o-1', total: '59.97' } });
  call('screen', analytics.screen, { userId, name: 'Cart' });
  call('group', analytics.group, { userId, groupId: 'acme' });
  call('alias', analytics.alias, { userId, previousId: `anon-${userId}` });

  await analytics.closeAndFlush({ timeout: 60_000 });
  const results = await Promise.all(calls);
  process.stdout.write(JSON.stringify({ calls: results, requests: answers, errors }) + '\n');
}

main().catch((e) => {
  console.error(`node SDK driver: ${e.stack || e}`);
  process.exit(1);
});
