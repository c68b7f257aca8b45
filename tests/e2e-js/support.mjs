// Helpers the JS tests share: the gateway's address from the environment, a run tag on every
// sandbox, and a tracker that kills each sandbox a test file made, whatever its tests did.
//
// `cargo xtask e2e` sets E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY; README.md says how
// to run a file by hand.

import { randomUUID } from 'node:crypto'
import { after } from 'node:test'
import assert from 'node:assert/strict'

import { Sandbox } from 'e2b'

const REQUIRED_ENV = ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']

const missing = REQUIRED_ENV.filter((name) => !process.env[name])
if (missing.length > 0) {
  throw new Error(
    `set ${missing.join(', ')} (see tests/e2e-js/README.md); ` +
      '`cargo xtask e2e js` starts a gateway and sets them'
  )
}
if (['1', 'true'].includes((process.env.E2B_DEBUG ?? '').toLowerCase())) {
  throw new Error('E2B_DEBUG must be unset: it makes the SDK skip the API')
}

/** Metadata key that tags every sandbox of this run. */
export const RUN_KEY = 'coppice-e2e-run'
/** This process's run id (one per test file: node runs each file in its own process). */
export const RUN_ID = randomUUID().replaceAll('-', '').slice(0, 12)

const created = []

/**
 * Creates a sandbox of `cls` (e2b's or the code interpreter's `Sandbox`) with this run's tag;
 * it is killed after the file's tests, whatever they did.
 */
export async function createSandbox(cls, template, opts = {}) {
  const metadata = { ...(opts.metadata ?? {}), [RUN_KEY]: RUN_ID }
  const sbx = template
    ? await cls.create(template, { ...opts, metadata })
    : await cls.create({ ...opts, metadata })
  created.push(sbx.sandboxId)
  return sbx
}

/** A name no other test uses, for paths inside shared sandboxes. */
export function unique(prefix) {
  return `${prefix}-${randomUUID().slice(0, 8)}`
}

// Kills what this file created, then fails the run if a tagged sandbox is still listed.
after(async () => {
  const failures = []
  for (const id of created.splice(0)) {
    try {
      // false (already gone) is fine: the test may have killed it itself.
      await Sandbox.kill(id)
    } catch (err) {
      failures.push(`${id}: ${err}`)
    }
  }
  const leaked = []
  const paginator = Sandbox.list({ query: { metadata: { [RUN_KEY]: RUN_ID } } })
  while (paginator.hasNext) {
    for (const info of await paginator.nextItems()) {
      if (info.metadata?.[RUN_KEY] === RUN_ID) {
        leaked.push(info.sandboxId)
        await Sandbox.kill(info.sandboxId)
      }
    }
  }
  assert.deepEqual(failures, [], 'teardown could not kill every sandbox')
  assert.deepEqual(leaked, [], 'sandboxes outlived their tests (now killed)')
})
