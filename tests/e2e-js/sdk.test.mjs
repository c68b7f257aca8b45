// The base template through the E2B JS SDK (`e2b`): the commands E2B's base image gives its
// users, run as they would run them, and files written and read back. Everything here needs
// only the gateway and the default template.

import { before, test } from 'node:test'
import assert from 'node:assert/strict'

import { CommandExitError, Sandbox } from 'e2b'

import { createSandbox, unique } from './support.mjs'

let sbx

before(async () => {
  sbx = await createSandbox(Sandbox)
})

/** Runs `cmd` (as `user`, in /home/user, as the SDK does) and returns its stdout. */
async function run(cmd, opts) {
  try {
    const result = await sbx.commands.run(cmd, opts)
    assert.equal(result.exitCode, 0)
    return result.stdout
  } catch (err) {
    if (err instanceof CommandExitError) {
      assert.fail(`\`${cmd}\` exited ${err.exitCode}: ${err.stdout}${err.stderr}`)
    }
    throw err
  }
}

test('the base image has the commands E2B users expect', async () => {
  const versions = {
    'git --version': /^git version 2\./,
    'curl --version': /^curl 7\./,
    'wget --version': /^GNU Wget 1\./,
    'python --version': /^Python 3\.11\./,
    'python3 --version': /^Python 3\.11\./,
    'pip --version': /^pip \d+.*python 3\.11/,
    'pip3 --version': /^pip \d+/,
    'node --version': /^v\d+\./,
    'npm --version': /^\d+\.\d+\.\d+/,
    'gcc --version': /^gcc /,
    'g++ --version': /^g\+\+ /,
    'make --version': /^GNU Make /,
    'sudo --version': /^Sudo version /,
    'ps --version': /^ps from procps-ng /,
    'gh --version': /^gh version /,
  }
  for (const [cmd, pattern] of Object.entries(versions)) {
    const out = await run(cmd)
    assert.match(out, pattern, `\`${cmd}\` printed ${JSON.stringify(out)}`)
  }
})

test('commands run as user with passwordless sudo and E2B login environment', async () => {
  assert.equal(await run('whoami'), 'user\n')
  assert.equal(await run('pwd'), '/home/user\n')
  assert.equal(await run('echo $HOME $SHELL $LANG'), '/home/user /bin/bash C.UTF-8\n')
  assert.match(await run('id -nG'), /\bsudo\b/)
  assert.equal(await run('sudo -n whoami'), 'root\n')
  assert.equal(await run('whoami', { user: 'root' }), 'root\n')
})

test('files written through the SDK are read back and seen by commands', async () => {
  const dir = `/home/user/${unique('files')}`
  const text = 'hello from the JS SDK\nsecond line\n'
  await sbx.files.write(`${dir}/hello.txt`, text)
  assert.equal(await sbx.files.read(`${dir}/hello.txt`), text)
  assert.equal(await run(`cat ${dir}/hello.txt`), text)
  assert.equal(await run(`stat -c %U ${dir}/hello.txt`), 'user\n')

  const bytes = new Uint8Array([0, 1, 2, 253, 254, 255])
  await sbx.files.write(`${dir}/bytes.bin`, bytes.buffer)
  const back = await sbx.files.read(`${dir}/bytes.bin`, { format: 'bytes' })
  assert.deepEqual(Array.from(back), Array.from(bytes))
})

test('a C program compiles and runs', async () => {
  const dir = `/home/user/${unique('cc')}`
  await sbx.files.write(
    `${dir}/hello.c`,
    '#include <stdio.h>\nint main(void) { printf("hello %d\\n", 6 * 7); return 0; }\n'
  )
  assert.equal(await run(`cd ${dir} && cc -O2 -o hello hello.c && ./hello`), 'hello 42\n')
})

test('pip installs a local package as user, without PEP 668 refusing it', async () => {
  const dir = `/home/user/${unique('pkg')}`
  await sbx.files.write(
    `${dir}/pyproject.toml`,
    '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n' +
      '[project]\nname = "coppice_probe"\nversion = "0.1"\n'
  )
  await sbx.files.write(`${dir}/coppice_probe.py`, 'ANSWER = 42\n')
  // No network in a test: no index, and the build backend that is already installed.
  await run(`pip install --no-index --no-build-isolation ${dir}`)
  assert.equal(await run('python -c "import coppice_probe; print(coppice_probe.ANSWER)"'), '42\n')
})

test('npm installs a local package and node imports it', async () => {
  const dir = `/home/user/${unique('npm')}`
  await sbx.files.write(
    `${dir}/lib/package.json`,
    JSON.stringify({ name: 'coppice-lib', version: '1.0.0', type: 'module', exports: './index.js' })
  )
  await sbx.files.write(`${dir}/lib/index.js`, 'export const answer = 6 * 7\n')
  await sbx.files.write(
    `${dir}/app/package.json`,
    JSON.stringify({ name: 'app', version: '1.0.0', type: 'module', private: true })
  )
  await sbx.files.write(
    `${dir}/app/main.js`,
    "import { answer } from 'coppice-lib'\nconsole.log(await Promise.resolve(answer))\n"
  )
  await run(`cd ${dir}/app && npm install --offline --no-audit --no-fund ../lib`)
  assert.equal(await run(`cd ${dir}/app && node main.js`), '42\n')
})

test('git commits and logs in a new repository', async () => {
  const dir = `/home/user/${unique('repo')}`
  await run(`git init -q -b main ${dir}`)
  await sbx.files.write(`${dir}/README.md`, 'hello\n')
  await run(
    `cd ${dir} && git add README.md && ` +
      'git -c user.name=Coppice -c user.email=e2e@example.com commit -q -m first'
  )
  assert.equal(await run(`cd ${dir} && git log --format=%s`), 'first\n')
})
