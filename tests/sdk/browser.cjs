// Drives the shop page (deploy/local/shop/index.html) in headless Chromium, the way a shopper
// would, and prints what happened as JSON lines on stdout.
//
//   node tests/sdk/browser.cjs <mode> <page url> <ingest origin> [email]
//
// The page loads Segment's official browser SDK and sends every call to Pulse ingest. This
// script only clicks; it records every request the browser made to ingest with its answer, so
// that the caller (tests/tests/sdks.rs, deploy/local/demo) can check the answers here and the
// events in Kafka. Modes:
//
//   shop     sign in, search, view, add two products, check out, leave (sendBeacon); then the
//            partner's own code posts JSON with Basic auth (a CORS preflight). One JSON line.
//   browse   view and add a product before signing in (the SDK's anonymous id alone), then
//            sign in on the same page, add another and check out: one person, one device.
//            One JSON line, with the SDK's `anonymousId`.
//   outage   add a product while ingest cannot reach Kafka: prints {"unavailable": …} at the
//            first 503, then waits until the SDK's own retries got every call accepted, and
//            prints the result line. The caller restores Kafka when it reads the first line.
//   refused  load the page (its `page` call) and print the answers (the key's partner does not
//            allow this page's origin).
//
// Chromium is Debian's (/usr/bin/chromium, or $PULSE_CHROMIUM); nothing is downloaded.
'use strict';

const { chromium } = require('playwright-core');

const [mode, pageUrl, ingestOrigin, email] = process.argv.slice(2);
if (!['shop', 'browse', 'outage', 'refused'].includes(mode) || !pageUrl || !ingestOrigin) {
  console.error('usage: browser.cjs shop|browse|outage|refused <page url> <ingest origin> [email]');
  process.exit(2);
}
// How long to wait for the SDK's deliveries before giving up (the caller reports what
// arrived): a bound on a hang, not a performance goal.
const PATIENCE_MS = 90_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Waits until `ready()` holds or PATIENCE_MS passed; says which.
async function waitFor(ready) {
  const deadline = Date.now() + PATIENCE_MS;
  while (!ready()) {
    if (Date.now() > deadline) return false;
    await sleep(100);
  }
  return true;
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.PULSE_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // This machine has no internet: without these, Chromium keeps trying Google's hosts.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const requests = [];
  const pending = new Set();
  const consoleLines = [];
  try {
    const page = await browser.newPage();
    page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
    page.on('request', (r) => {
      if (r.url().startsWith(ingestOrigin)) pending.add(r);
    });
    page.on('requestfailed', (r) => {
      if (!pending.delete(r)) return;
      requests.push({
        method: r.method(),
        url: r.url(),
        type: r.resourceType(),
        failure: r.failure() ? r.failure().errorText : 'failed',
        requestHeaders: r.headers(),
        body: r.postData(),
      });
    });
    page.on('requestfinished', async (r) => {
      if (!pending.has(r)) return;
      const response = await r.response();
      requests.push({
        method: r.method(),
        url: r.url(),
        type: r.resourceType(),
        status: response ? response.status() : null,
        requestHeaders: r.headers(),
        responseHeaders: response ? await response.allHeaders() : {},
        body: r.postData(),
        answer: response ? await response.text().catch(() => null) : null,
      });
      pending.delete(r);
    });

    await page.goto(pageUrl, { waitUntil: 'load' });
    const out = { mode };
    if (mode === 'shop') {
      if (email) await page.fill('#email', email);
      await page.click('#sign-in');
      await page.click('#search');
      await page.click('.product[data-id="sku-shoe"] .view');
      await page.click('.product[data-id="sku-shoe"] .add');
      await page.click('.product[data-id="sku-sock"] .add');
      await page.click('#checkout');
      await page.click('#beacon');
    } else if (mode === 'browse') {
      await page.click('.product[data-id="sku-sock"] .view');
      await page.click('.product[data-id="sku-sock"] .add');
      if (email) await page.fill('#email', email);
      await page.click('#sign-in');
      await page.click('.product[data-id="sku-shoe"] .add');
      await page.click('#checkout');
      out.anonymousId = await page.evaluate(async () => (await analytics.user()).anonymousId());
    } else if (mode === 'outage') {
      if (email) await page.fill('#email', email);
      await page.click('#sign-in');
      await page.click('.product[data-id="sku-cap"] .add');
      const refused = () => requests.find((r) => r.status === 503);
      if (!(await waitFor(refused))) throw new Error('no 503 from ingest while Kafka was cut');
      const r = refused();
      process.stdout.write(
        JSON.stringify({ unavailable: { url: r.url, retryAfter: r.responseHeaders['retry-after'] } }) + '\n'
      );
    }

    // Every call of the page resolves once the SDK has taken it (sent it, or queued it).
    out.calls = await page.evaluate(
      (ms) =>
        Promise.race([
          Promise.all(window.pulseCalls),
          new Promise((_, reject) => setTimeout(() => reject(new Error('calls pending')), ms)),
        ]),
      PATIENCE_MS
    );
    if (mode !== 'refused') {
      // A resolved call is in the SDK's hands, not yet sent: a batching SDK sends it with
      // the next batch, and after a failure the SDK retries on its own (its queue, its
      // backoff). Wait until each call is in a request that ingest accepted.
      const accepted = () =>
        out.calls.every((id) => requests.some((r) => r.status === 200 && (r.body || '').includes(id)));
      out.allAccepted = await waitFor(accepted);
    }
    if (mode === 'shop') {
      // What a partner's own script does beside the SDK: JSON with the key in Basic auth. Not
      // a "simple" request, so the browser sends a CORS preflight first and lets the script
      // read the answer only if both carry the right headers.
      out.jsonFetch = await page.evaluate(async ([api, key, id]) => {
        try {
          const res = await fetch(api + '/v1/track', {
            method: 'POST',
            headers: { 'Content-Type': 'application/json', Authorization: 'Basic ' + btoa(key + ':'),
                       'X-Retry-Count': '0' },
            body: JSON.stringify({ type: 'track', event: 'Coupon Entered', userId: 'json-user', messageId: id }),
          });
          return { status: res.status, body: await res.json(), messageId: id };
        } catch (e) {
          return { error: String(e), messageId: id };
        }
      }, [ingestOrigin, new URL(pageUrl).searchParams.get('key'), 'json-' + Date.now()]);
    }
    // Then until every request to ingest has its answer (a beacon is answered after the
    // page's promise resolved).
    await waitFor(() => pending.size === 0);
    out.requests = requests;
    out.console = consoleLines;
    out.log = await page.textContent('#log');
    process.stdout.write(JSON.stringify(out) + '\n');
  } catch (e) {
    // What the page said is usually the reason (a script error, a refused request).
    for (const line of consoleLines) console.error(`page ${line}`);
    throw e;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`browser driver: ${e.stack || e}`);
  process.exit(1);
});
