// The dashboard (`/dashboard`) in a real browser: Debian's Chromium, headless, driven over
// CDP by playwright-core (no browser download). The page asks for the API key, lists a
// sandbox the SDK creates within 2 s, kills it from the page, renders every view without a
// console error, at 1280 px and on a phone, light and dark.

import { existsSync } from 'node:fs'
import { createServer } from 'node:http'
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'

import { Sandbox } from 'e2b'
import { chromium } from 'playwright-core'

import { createSandbox } from './support.mjs'

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium'
const skip = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install chromium; cargo xtask ci installs it)`
if (skip) console.log(`SKIP dashboard.test.mjs: ${skip}`)

// `DASHBOARD_SCREENSHOTS=DIR` saves each view at each size there (docs/dashboard/ holds them).
const SHOTS = process.env.DASHBOARD_SCREENSHOTS

const URL_BASE = process.env.E2B_API_URL
const KEY = process.env.E2B_API_KEY

let browser
/** Console errors, warnings and uncaught exceptions of every page, with the page's name. */
const problems = []

before(async () => {
  if (skip) return
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] })
})

after(async () => {
  await browser?.close()
})

/** A page at `width`×`height` in `scheme`, watched for console errors. */
async function open(name, { width = 1280, height = 800, scheme = 'light', onResponse } = {}) {
  const page = await browser.newPage({ viewport: { width, height }, colorScheme: scheme })
  if (onResponse) page.on('response', onResponse)
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') problems.push(`${name}: ${m.text()}`)
  })
  page.on('pageerror', (e) => problems.push(`${name}: ${e}`))
  await page.goto(`${URL_BASE}/dashboard`)
  return page
}

async function signIn(page) {
  await page.waitForSelector('#login:not([hidden])')
  await page.fill('#key', KEY)
  await page.click('#login button[type=submit]')
  await page.waitForSelector('#nav:not([hidden])')
}

test('the page asks for the key and refuses a wrong one', { skip }, async () => {
  // What a first load transfers (the page and its two files, nothing else) and how long
  // until the sign-in form is on screen: reported, the budget is 200 KB.
  const files = new Map()
  const started = Date.now()
  const page = await open('sign-in', {
    onResponse: async (r) => {
      if (new URL(r.url()).pathname.startsWith('/dashboard')) {
        files.set(new URL(r.url()).pathname, (await r.body()).length)
      }
    },
  })
  await page.waitForSelector('#login:not([hidden])')
  const bytes = [...files.values()].reduce((a, b) => a + b, 0)
  console.log(`first load: ${files.size} files, ${bytes} bytes, sign-in form after ${Date.now() - started} ms`)
  assert.ok(bytes <= 200_000, `first load ${bytes} bytes`)
  assert.equal(await page.isHidden('#view-sandboxes'), true, 'no data before a key')
  await page.fill('#key', 'e2b_0000000000000000000000000000000000000000')
  await page.click('#login button[type=submit]')
  await page.waitForSelector('#login-error:text("did not accept")')
  problems.length = 0 // the refused key's 401 is logged by the browser, as it should be
  await signIn(page)
  // Kept for the tab: a reload does not ask again.
  await page.reload()
  await page.waitForSelector('#nav:not([hidden])')
  assert.equal(await page.isHidden('#login'), true)
  await page.close()
})

test('a new sandbox appears within 2 s and is killed from the page', { skip }, async () => {
  const page = await open('sandboxes')
  await signIn(page)
  const sbx = await createSandbox(Sandbox, undefined, { metadata: { via: 'dashboard' } })
  const shown = Date.now()
  const row = `tr[data-sandbox="${sbx.sandboxId}"]`
  await page.waitForSelector(row, { timeout: 2000 })
  console.log(`sandbox listed ${Date.now() - shown} ms after create returned`)
  assert.equal(await page.textContent(`${row} .badge`), 'running')

  // Its detail: fields, logs and its created event.
  await page.click(`${row} td.id`)
  await page.waitForSelector('#detail:not([hidden]) #detail-events li .type')
  assert.equal(await page.textContent('#detail-title'), sbx.sandboxId)
  assert.match(await page.textContent('#detail-logs'), /Sandbox initialized/)
  assert.match(await page.textContent('#detail-events'), /sandbox\.lifecycle\.created/)

  // Kill asks once more, then kills.
  await page.click(`${row} button[data-action=kill]`)
  assert.equal(await page.textContent(`${row} button[data-action=kill]`), 'Confirm kill')
  await page.click(`${row} button[data-action=kill]`)
  await page.waitForSelector(row, { state: 'detached', timeout: 10_000 })
  assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'the page killed it')
  await page.close()
})

test('a webhook delivery is replayed from the page', { skip }, async () => {
  // A receiver on loopback (the e2e gateway runs with --webhook-allow 127.0.0.0/8).
  const received = []
  const server = createServer((req, res) => {
    let body = ''
    req.on('data', (c) => (body += c))
    req.on('end', () => {
      received.push(JSON.parse(body))
      res.end('ok')
    })
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const api = (path, init = {}) =>
    fetch(`${URL_BASE}${path}`, {
      ...init,
      headers: { 'x-api-key': KEY, 'content-type': 'application/json' },
    })
  let hook
  try {
    const made = await api('/events/webhooks', {
      method: 'POST',
      body: JSON.stringify({
        name: 'dashboard-replay',
        url: `http://127.0.0.1:${server.address().port}/hook`,
        events: ['sandbox.lifecycle.created'],
        signatureSecret: 'dashboard-replay-secret-0123456789',
      }),
    })
    assert.equal(made.status, 201, await made.clone().text())
    hook = await made.json()
    const sbx = await createSandbox(Sandbox, undefined, { metadata: { via: 'dashboard-webhook' } })
    const page = await open('webhooks')
    await signIn(page)
    await page.click('#nav a[data-view=webhooks]')
    await page.waitForSelector('#webhooks td:text("dashboard-replay")')
    const row = '#deliveries tbody tr:has(td:text("dashboard-replay"))'
    await page.waitForSelector(row, { timeout: 15_000 })
    const mine = received.filter((e) => e.sandboxId === sbx.sandboxId)
    assert.equal(mine.length, 1, 'delivered once')
    await page.click(`${row} >> nth=0 >> button[data-action=replay]`)
    await page.waitForSelector(`${row} >> nth=0 >> button:text("Queued")`)
    const deadline = Date.now() + 15_000
    while (received.filter((e) => e.id === mine[0].id).length < 2 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200))
    }
    assert.equal(received.filter((e) => e.id === mine[0].id).length, 2, 'the same event again')
    await page.close()
  } finally {
    if (hook) await api(`/events/webhooks/${hook.id}`, { method: 'DELETE' })
    server.close()
  }
})

test('every view renders without console errors, at 1280 px and on a phone, light and dark', { skip }, async () => {
  const backgrounds = {}
  for (const [width, height, scheme] of [
    [1280, 800, 'light'],
    [390, 844, 'dark'],
  ]) {
    const page = await open(`${width}-${scheme}`, { width, height, scheme })
    await signIn(page)
    for (const view of ['sandboxes', 'events', 'webhooks', 'templates', 'pool', 'audit']) {
      await page.click(`#nav a[data-view=${view}]`)
      await page.waitForSelector(`#view-${view}:not([hidden])`)
      await page.waitForTimeout(400)
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
      assert.ok(overflow <= 0, `${view} at ${width} px is ${overflow} px too wide`)
      if (SHOTS) await page.screenshot({ path: `${SHOTS}/${view}-${width}-${scheme}.png`, fullPage: true })
    }
    await page.click('#nav a[data-view=templates]')
    await page.waitForSelector('#templates tr[data-template="code-interpreter-v1"]')
    await page.click('#nav a[data-view=pool]')
    await page.waitForSelector('#pool tbody tr')
    await page.click('#nav a[data-view=audit]')
    await page.waitForSelector('#audit:text("audit log")')
    backgrounds[scheme] = await page.evaluate(() => getComputedStyle(document.body).backgroundColor)
    await page.close()
  }
  assert.notEqual(backgrounds.light, backgrounds.dark, 'dark mode changes the page')
  assert.deepEqual(problems, [])
})
