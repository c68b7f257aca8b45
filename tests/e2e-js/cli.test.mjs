// E2B's own command-line tool (`@e2b/cli`, the `e2b` command, pinned in package.json)
// against the gateway: it finds the API as the JS SDK does, from E2B_API_URL and
// E2B_API_KEY, so an operator's `e2b sandbox list`, `metrics`, `logs`, `kill` and
// `e2b template list` work unchanged. Each call has a time limit.

import { execFile } from 'node:child_process'
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { promisify } from 'node:util'

import { Sandbox } from 'e2b'

import { createSandbox } from './support.mjs'

const E2B = new URL('./node_modules/.bin/e2b', import.meta.url).pathname

/** Runs `e2b ...args` with this process's environment; its stdout. */
async function e2b(...args) {
  const { stdout } = await promisify(execFile)(E2B, args, {
    timeout: 60_000,
    env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0' },
  })
  return stdout
}

/** Calls `f` every 500 ms until it returns a truthy value, for at most `ms`. */
async function eventually(what, ms, f) {
  const end = Date.now() + ms
  for (;;) {
    const got = await f()
    if (got) return got
    if (Date.now() > end) assert.fail(`${what}: not within ${ms} ms`)
    await new Promise((r) => setTimeout(r, 500))
  }
}

test('e2b sandbox list, metrics, logs and kill', async () => {
  const sbx = await createSandbox(Sandbox, undefined, { metadata: { via: 'e2b-cli' } })
  await sbx.commands.run('echo hello')

  const listed = JSON.parse(await e2b('sandbox', 'list', '--format', 'json'))
  const mine = listed.find((s) => s.sandboxId === sbx.sandboxId)
  assert.ok(mine, `${sbx.sandboxId} not in ${JSON.stringify(listed)}`)
  assert.equal(mine.state, 'running')
  assert.equal(mine.metadata.via, 'e2b-cli')

  // A sample every 5 s: the first may take that long.
  await eventually('a metrics line', 20_000, async () =>
    /CPU: .*Memory: .*Disk: /.test(await e2b('sandbox', 'metrics', sbx.sandboxId))
  )

  const logs = await e2b('sandbox', 'logs', sbx.sandboxId)
  assert.match(logs, /Sandbox initialized/)

  assert.match(await e2b('sandbox', 'kill', sbx.sandboxId), /has been killed/)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'the CLI killed it')
})

test('e2b template list', async () => {
  const out = await e2b('template', 'list')
  assert.match(out, /\bbase\b/)
  assert.match(out, /code-interpreter-v1/)
})
