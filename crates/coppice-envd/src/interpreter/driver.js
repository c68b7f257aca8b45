// Coppice code-interpreter driver: one persistent JavaScript (or TypeScript) context on
// Node.js.
//
// The agent (coppice-envd) starts this file with a unix stream socket on the fd named by
// $COPPICE_DRIVER_FD, and `typescript` as its argument for TypeScript contexts. It writes
// one JSON request per line, {"code", "env", "n"}, and reads one JSON event per line:
// ready, result, error, done. User output is not framed: fds 1 and 2 are pipes the agent
// reads as they are written (Node writes to pipes synchronously on Linux, so everything a
// cell printed is in the pipe before `done` is sent). See docs/code-interpreter.md.
//
// A cell is parsed with acorn and rewritten into an async function run in the global
// context: top-level declarations become global `var`s (so later cells see them and may
// declare them again), `import` becomes an awaited dynamic import resolved from the
// context's working directory, top-level `await` works, and the value of a final
// expression statement is the main result. TypeScript cells are first transpiled with the
// `typescript` module, loaded on the first TypeScript cell.
'use strict';

const net = require('net');
const path = require('path');
const util = require('util');
const vm = require('vm');
const { createRequire, builtinModules } = require('module');
const { pathToFileURL } = require('url');

const FD = Number(process.env.COPPICE_DRIVER_FD);
delete process.env.COPPICE_DRIVER_FD;
const TYPESCRIPT = process.argv[2] === 'typescript';
// Where Debian's node-* packages put their modules; also searched when Node's own module
// path does not include them (a Node.js from elsewhere than Debian).
const MODULE_DIRS = ['/usr/share/nodejs', '/usr/lib/nodejs', '/usr/local/lib/node_modules', '/usr/lib/node_modules'];

function load(name) {
  try {
    return require(name);
  } catch (e) {
    for (const dir of MODULE_DIRS) {
      try {
        return require(path.join(dir, name));
      } catch (_) {
        // Try the next directory.
      }
    }
    throw e;
  }
}

const acorn = load('acorn');
let ts = null;

const chan = new net.Socket({ fd: FD, readable: true, writable: true });

function send(event) {
  chan.write(JSON.stringify(event) + '\n');
}

// Picks the target of a package.json `exports` entry for an ES module import.
function exportTarget(entry) {
  if (typeof entry === 'string') return entry;
  if (Array.isArray(entry)) {
    for (const e of entry) {
      const t = exportTarget(e);
      if (t) return t;
    }
    return null;
  }
  if (entry && typeof entry === 'object') {
    for (const condition of ['node', 'import', 'default']) {
      if (condition in entry) {
        const t = exportTarget(entry[condition]);
        if (t) return t;
      }
    }
  }
  return null;
}

// Finds a package that `require.resolve` refuses because its `exports` offer only an
// `import` condition: the nearest node_modules/<name> from `dir` up, read as Node.js would
// for `import` (exact subpaths only, no patterns).
function resolveImportOnly(spec, dir) {
  const parts = spec.split('/');
  const nameLength = spec.startsWith('@') ? 2 : 1;
  const name = parts.slice(0, nameLength).join('/');
  const sub = parts.length > nameLength ? `./${parts.slice(nameLength).join('/')}` : '.';
  for (let d = dir; ; d = path.dirname(d)) {
    const pkgDir = path.join(d, 'node_modules', name);
    let pkg = null;
    try {
      pkg = JSON.parse(require('fs').readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));
    } catch (_) {
      pkg = null;
    }
    if (pkg !== null && pkg.exports !== undefined) {
      const exp = pkg.exports;
      const keyed = exp && typeof exp === 'object' && !Array.isArray(exp) && Object.keys(exp).some((k) => k.startsWith('.'));
      const target = keyed ? exportTarget(exp[sub]) : sub === '.' ? exportTarget(exp) : null;
      if (target) return path.join(pkgDir, target);
    }
    if (d === path.dirname(d)) return null;
  }
}

// Imports resolve as they would from a module in the working directory: relative paths and
// packages in its node_modules, then the global module directories.
async function importFrom(spec) {
  if (spec.startsWith('node:') || builtinModules.includes(spec)) {
    return import(spec);
  }
  const base = path.join(process.cwd(), '__coppice_cell__.js');
  let target = spec;
  if (spec.startsWith('./') || spec.startsWith('../') || spec.startsWith('/')) {
    target = pathToFileURL(path.resolve(process.cwd(), spec)).href;
  } else if (!/^[a-z]+:/i.test(spec)) {
    try {
      target = pathToFileURL(createRequire(base).resolve(spec)).href;
    } catch (e) {
      let found = e.code === 'ERR_PACKAGE_PATH_NOT_EXPORTED' ? resolveImportOnly(spec, process.cwd()) : null;
      if (found !== null) return import(pathToFileURL(found).href);
      for (const dir of MODULE_DIRS) {
        try {
          found = createRequire(path.join(dir, 'x.js')).resolve(spec);
          break;
        } catch (_) {
          // Try the next directory.
        }
      }
      if (found === null) throw e;
      target = pathToFileURL(found).href;
    }
  }
  return import(target);
}
Object.defineProperty(globalThis, '__coppice_import', { value: importFrom });

function patternNames(node, out) {
  if (!node) return;
  switch (node.type) {
    case 'Identifier':
      out.push(node.name);
      break;
    case 'ObjectPattern':
      for (const p of node.properties) patternNames(p.type === 'RestElement' ? p.argument : p.value, out);
      break;
    case 'ArrayPattern':
      for (const el of node.elements) patternNames(el, out);
      break;
    case 'RestElement':
      patternNames(node.argument, out);
      break;
    case 'AssignmentPattern':
      patternNames(node.left, out);
      break;
    default:
      break;
  }
}

// Rewrites a cell into a script whose completion value is a promise of the cell's value.
function rewrite(code) {
  const program = acorn.parse(code, {
    ecmaVersion: 'latest',
    sourceType: 'script',
    allowAwaitOutsideFunction: true,
    allowImportExportEverywhere: true,
    allowHashBang: true,
  });
  const src = (node) => code.slice(node.start, node.end);
  const names = new Set();
  const functions = [];
  const body = [];
  let imports = 0;
  const statements = program.body;
  statements.forEach((stmt, i) => {
    let node = stmt;
    if (node.type === 'ExportNamedDeclaration' || node.type === 'ExportDefaultDeclaration') {
      if (!node.declaration) return;
      node = node.declaration;
    } else if (node.type === 'ExportAllDeclaration') {
      return;
    }
    const last = i === statements.length - 1;
    switch (node.type) {
      case 'ImportDeclaration': {
        const m = `__coppice_m${imports++}`;
        body.push(`const ${m} = await __coppice_import(${src(node.source)});`);
        for (const s of node.specifiers) {
          names.add(s.local.name);
          if (s.type === 'ImportDefaultSpecifier') {
            body.push(`${s.local.name} = ('default' in ${m}) ? ${m}.default : ${m};`);
          } else if (s.type === 'ImportNamespaceSpecifier') {
            body.push(`${s.local.name} = ${m};`);
          } else {
            const imported = s.imported.type === 'Literal' ? JSON.stringify(s.imported.value) : JSON.stringify(s.imported.name);
            body.push(`${s.local.name} = ${m}[${imported}];`);
          }
        }
        break;
      }
      case 'VariableDeclaration':
        for (const d of node.declarations) {
          const found = [];
          patternNames(d.id, found);
          found.forEach((n) => names.add(n));
          if (d.init) {
            body.push(`(${src(d.id)} = ${src(d.init)});`);
          } else if (node.kind !== 'var') {
            body.push(`${src(d.id)} = undefined;`);
          }
        }
        break;
      case 'FunctionDeclaration':
        if (node.id) {
          names.add(node.id.name);
          // Function declarations are hoisted: defined before the rest of the cell runs.
          functions.push(`${node.id.name} = ${src(node)};`);
        } else {
          body.push(`(${src(node)});`);
        }
        break;
      case 'ClassDeclaration':
        if (node.id) {
          names.add(node.id.name);
          body.push(`${node.id.name} = ${src(node)};`);
        } else {
          body.push(`(${src(node)});`);
        }
        break;
      case 'ExpressionStatement':
        body.push(last ? `return (${src(node.expression)});` : `${src(node)};`);
        break;
      default:
        if (stmt.type === 'ExportDefaultDeclaration') {
          body.push(last ? `return (${src(node)});` : `(${src(node)});`);
        } else {
          // The `;` ends a statement the cell left to automatic semicolon insertion, so
          // the next generated line cannot continue it.
          body.push(`${src(node)};`);
        }
        break;
    }
  });
  const hoisted = names.size ? `var ${[...names].join(', ')};\n` : '';
  return `${hoisted}(async () => {\n${functions.join('\n')}\n${body.join('\n')}\n})()`;
}

let compilerOptions = null;

function transpile(code) {
  if (ts === null) {
    ts = load('typescript');
    compilerOptions = {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.ESNext,
      esModuleInterop: true,
      sourceMap: false,
    };
    // Keep imports whose names are used only in later cells: TypeScript would drop them as
    // unused. The option for that changed name in TypeScript 5.
    if (parseInt(ts.version, 10) >= 5) {
      compilerOptions.verbatimModuleSyntax = true;
    } else {
      compilerOptions.isolatedModules = true;
      compilerOptions.preserveValueImports = true;
    }
  }
  const out = ts.transpileModule(code, {
    reportDiagnostics: true,
    fileName: 'cell.ts',
    compilerOptions,
  });
  const errors = (out.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (errors.length) {
    const err = new SyntaxError(errors.map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n')).join('\n'));
    err.name = 'TSError';
    throw err;
  }
  return out.outputText;
}

function bundle(value) {
  const data = {};
  if (value !== null && (typeof value === 'object' || typeof value === 'function')) {
    for (const [method, mime] of [
      ['_toHtml', 'text/html'],
      ['_toSvg', 'image/svg+xml'],
      ['_toPng', 'image/png'],
      ['_toJpeg', 'image/jpeg'],
      ['_toMarkdown', 'text/markdown'],
    ]) {
      if (typeof value[method] === 'function') {
        try {
          data[mime] = String(value[method]());
        } catch (e) {
          process.stderr.write(util.inspect(e) + '\n');
        }
      }
    }
    if (typeof value._toMime === 'function') {
      try {
        Object.assign(data, value._toMime());
      } catch (e) {
        process.stderr.write(util.inspect(e) + '\n');
      }
    }
  }
  if (!('text/plain' in data)) data['text/plain'] = util.inspect(value);
  return data;
}

function report(err) {
  let name = 'Error';
  let value = '';
  let traceback = '';
  if (err instanceof Error || (err && typeof err === 'object' && 'message' in err)) {
    name = String(err.name || 'Error');
    value = String(err.message);
    traceback = String(err.stack || `${name}: ${value}`);
  } else {
    name = 'Error';
    value = util.inspect(err);
    traceback = `Uncaught ${value}`;
  }
  send({ t: 'error', name, value, traceback });
}

// Settled when SIGINT arrives while a cell waits on something asynchronous. While the
// synchronous part of a cell runs, `breakOnSigint` turns SIGINT into an exception instead.
let interrupt = null;
process.on('SIGINT', () => {
  if (interrupt) interrupt();
});
// An error thrown by a callback or a rejected promise nobody awaits must not end the
// context, as it would end a Node.js program.
process.on('uncaughtException', (err) => {
  process.stderr.write(`Uncaught ${util.inspect(err)}\n`);
});
process.on('unhandledRejection', (err) => {
  process.stderr.write(`Unhandled promise rejection: ${util.inspect(err)}\n`);
});

async function execute(code, n) {
  let script;
  try {
    let rewritten;
    if (TYPESCRIPT) {
      rewritten = rewrite(transpile(code));
    } else {
      try {
        rewritten = rewrite(code);
      } catch (err) {
        // E2B's JavaScript kernel accepts TypeScript syntax too (its Babel preset strips
        // types in every cell). A cell that is not JavaScript gets the same chance here;
        // the compiler loads only then, so plain JavaScript never waits for it.
        if (!(err instanceof SyntaxError)) throw err;
        let stripped = null;
        try {
          stripped = rewrite(transpile(code));
        } catch (_) {
          throw err;
        }
        rewritten = stripped;
      }
    }
    script = new vm.Script(rewritten, { filename: `<cell-${n}>` });
  } catch (err) {
    if (err instanceof SyntaxError && typeof err.pos === 'number') {
      // acorn's message already carries the position: "Unexpected token (1:4)".
      send({ t: 'error', name: 'SyntaxError', value: err.message, traceback: `SyntaxError: ${err.message}` });
    } else {
      report(err);
    }
    return;
  }
  const interrupted = new Promise((_, reject) => {
    interrupt = () => reject(new Error('Script execution interrupted.'));
  });
  try {
    const value = await Promise.race([script.runInThisContext({ breakOnSigint: true }), interrupted]);
    if (value !== undefined) {
      send({ t: 'result', main: true, data: bundle(value) });
    }
  } catch (err) {
    report(err);
  } finally {
    interrupt = null;
  }
}

async function handle(request) {
  const saved = {};
  const env = request.env || {};
  for (const [key, value] of Object.entries(env)) {
    saved[key] = Object.prototype.hasOwnProperty.call(process.env, key) ? process.env[key] : undefined;
    process.env[key] = value;
  }
  try {
    await execute(String(request.code), request.n || 0);
  } finally {
    for (const [key, old] of Object.entries(saved)) {
      if (old === undefined) delete process.env[key];
      else process.env[key] = old;
    }
  }
  send({ t: 'done' });
}

let buffered = '';
const queue = [];
let busy = false;

async function pump() {
  if (busy) return;
  busy = true;
  while (queue.length) {
    const line = queue.shift();
    let request;
    try {
      request = JSON.parse(line);
    } catch (err) {
      report(err);
      send({ t: 'done' });
      continue;
    }
    await handle(request);
  }
  busy = false;
}

chan.setEncoding('utf8');
chan.on('data', (chunk) => {
  buffered += chunk;
  let at;
  while ((at = buffered.indexOf('\n')) >= 0) {
    queue.push(buffered.slice(0, at));
    buffered = buffered.slice(at + 1);
  }
  pump();
});
// The agent closed its end: the context is being removed.
chan.on('end', () => process.exit(0));
chan.on('error', () => process.exit(0));

send({ t: 'ready', pid: process.pid });
