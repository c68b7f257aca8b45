// The code interpreter through the E2B JS SDK (`@e2b/code-interpreter`), on the
// `code-interpreter-v1` template: python cells with IPython's semantics, rich results, and
// the javascript and typescript contexts E2B's interpreter offers.

import { before, test } from 'node:test'
import assert from 'node:assert/strict'

import { Sandbox } from '@e2b/code-interpreter'

import { createSandbox, unique } from './support.mjs'

let sbx

before(async () => {
  sbx = await createSandbox(Sandbox)
})

/** Fails with the cell's error, if it has one. */
function ok(execution) {
  if (execution.error) {
    const { name, value, traceback } = execution.error
    assert.fail(`the cell failed: ${name}: ${value}\n${traceback}`)
  }
  return execution
}

// Runs first, on a fresh sandbox: E2B starts these contexts with the sandbox.
test('list_code_contexts lists the default python and javascript contexts', async () => {
  const contexts = await sbx.listCodeContexts()
  const languages = contexts.map((c) => c.language)
  assert.ok(languages.includes('python'), `contexts: ${JSON.stringify(contexts)}`)
  assert.ok(languages.includes('javascript'), `contexts: ${JSON.stringify(contexts)}`)
})

test('python keeps state, and a final expression is the main result', async () => {
  ok(await sbx.runCode('x = 1'))
  const execution = ok(await sbx.runCode('x+1'))
  assert.equal(execution.text, '2')
  assert.equal(execution.results.length, 1)
  assert.equal(execution.results[0].isMainResult, true)
})

test('python streams stdout to callbacks and into logs', async () => {
  const seen = []
  const execution = ok(
    await sbx.runCode('print("one")\nprint("two")', { onStdout: (m) => seen.push(m.line) })
  )
  // How output is split into messages is the kernel's business (Jupyter batches it too).
  assert.equal(execution.logs.stdout.join(''), 'one\ntwo\n')
  assert.deepEqual(seen, execution.logs.stdout)
})

test('!pwd runs a shell command in python, in /home/user', async () => {
  const execution = ok(await sbx.runCode('!pwd'))
  assert.equal(execution.logs.stdout.join('').trim(), '/home/user')
})

test('an indented cell runs, as IPython dedents it', async () => {
  const execution = ok(await sbx.runCode('    y = 20\n    y + 1\n'))
  assert.equal(execution.text, '21')
})

test("a DataFrame's result carries its data", async () => {
  const execution = ok(
    await sbx.runCode('import pandas as pd\npd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})')
  )
  const result = execution.results[0]
  assert.ok(result, 'no result')
  assert.deepEqual(result.data, { a: [1, 2, 3], b: ['x', 'y', 'z'] })
})

test('a javascript context: state, top-level await, and an ESM import of a local module', async () => {
  const dir = `/home/user/${unique('esm')}`
  await sbx.files.write(`${dir}/answer.mjs`, 'export const answer = 6 * 7\n')
  const js = await sbx.createCodeContext({ language: 'js', cwd: dir })
  assert.equal(js.language, 'javascript')

  ok(await sbx.runCode('const base = 40', { context: js }))
  const awaited = ok(await sbx.runCode('await Promise.resolve(base + 2)', { context: js }))
  assert.equal(awaited.text, '42')

  const imported = ok(
    await sbx.runCode(`import { answer } from '${dir}/answer.mjs'\nconsole.log(answer)`, {
      context: js,
    })
  )
  assert.deepEqual(imported.logs.stdout, ['42\n'])
})

test('typescript: hello world', async () => {
  const execution = ok(
    await sbx.runCode('const message: string = "Hello World!"; console.log(message)', {
      language: 'ts',
    })
  )
  assert.deepEqual(execution.logs.stdout, ['Hello World!\n'])
})
