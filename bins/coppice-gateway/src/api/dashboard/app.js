// The Coppice dashboard: one page over the gateway's own API, with the caller's API key
// (asked once, kept in sessionStorage). Every value from the API reaches the page as text
// (textContent), never as markup.

const KEY = 'coppice.apiKey'
const SPARK_POINTS = 60
const views = ['sandboxes', 'events', 'webhooks', 'templates', 'pool', 'audit']

const $ = (sel) => document.querySelector(sel)

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v)
    else if (v !== undefined && v !== null) e.setAttribute(k, v)
  }
  for (const c of children) {
    if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c))
  }
  return e
}

class Unauthorized extends Error {}

/** Calls the API; 401 forgets the key and shows the sign-in form. */
async function api(path, { method = 'GET', body } = {}) {
  const headers = {}
  const key = sessionStorage.getItem(KEY)
  if (key) headers['x-api-key'] = key
  if (body !== undefined) headers['content-type'] = 'application/json'
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
  if (r.status === 401) {
    signOut(key ? 'The gateway did not accept this key.' : '')
    throw new Unauthorized()
  }
  const text = await r.text()
  let data = null
  if (text) {
    try {
      data = JSON.parse(text)
    } catch {
      data = text
    }
  }
  if (!r.ok) throw new Error((data && data.message) || `${method} ${path}: ${r.status}`)
  return { data, headers: r.headers }
}

// ---- formatting ----

function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000)
  if (s < 60) return `${Math.floor(s)}s`
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`
}

function when(iso) {
  const d = new Date(iso)
  return Number.isNaN(d.getTime()) ? String(iso ?? '') : d.toLocaleString()
}

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(bytes < 10485760 ? 1 : 0)} MiB`
}

/** An SVG sparkline of `values` scaled to `max`. */
function sparkline(values, max, kind) {
  const ns = 'http://www.w3.org/2000/svg'
  const svg = document.createElementNS(ns, 'svg')
  svg.setAttribute('class', `spark ${kind}`)
  svg.setAttribute('viewBox', '0 0 120 28')
  svg.setAttribute('preserveAspectRatio', 'none')
  svg.setAttribute('aria-hidden', 'true')
  const line = document.createElementNS(ns, 'polyline')
  const n = values.length
  const top = max > 0 ? max : 1
  const points = values.map((v, i) => {
    const x = n === 1 ? 120 : (i / (n - 1)) * 120
    const y = 26 - Math.min(1, v / top) * 24
    return `${x.toFixed(1)},${y.toFixed(1)}`
  })
  line.setAttribute('points', points.join(' '))
  svg.append(line)
  return svg
}

// ---- sign-in ----

function signOut(message) {
  sessionStorage.removeItem(KEY)
  stopPolling()
  $('#nav').hidden = true
  $('#signout').hidden = true
  for (const v of views) $(`#view-${v}`).hidden = true
  $('#login').hidden = false
  $('#login-error').textContent = message || ''
  $('#key').focus()
}

async function signIn(key) {
  if (key) sessionStorage.setItem(KEY, key)
  try {
    await api('/v2/sandboxes?limit=1')
  } catch (e) {
    if (!(e instanceof Unauthorized)) $('#login-error').textContent = e.message
    return false
  }
  $('#login').hidden = true
  $('#nav').hidden = false
  $('#signout').hidden = !sessionStorage.getItem(KEY)
  show()
  return true
}

// ---- polling ----

let timer = null
let generation = 0

function stopPolling() {
  generation += 1
  clearTimeout(timer)
  timer = null
}

/** Runs `refresh` now and then every `ms` until the view changes. */
function poll(refresh, ms) {
  stopPolling()
  const mine = generation
  const tick = async () => {
    try {
      await refresh()
    } catch (e) {
      if (e instanceof Unauthorized) return
      console.warn(e.message)
    }
    if (mine === generation) timer = setTimeout(tick, ms)
  }
  tick()
}

async function refreshHealth() {
  try {
    const r = await fetch('/health')
    const h = await r.json()
    const c = h.capacity
    $('#health').textContent = c
      ? `${h.status} · ${c.used} of ${c.maxSandboxes} places used · ${mib(c.memAvailableBytes)} free`
      : h.status
  } catch {
    $('#health').textContent = 'gateway unreachable'
  }
}

// ---- sandboxes ----

const history = new Map() // sandboxID -> { cpu: [], mem: [], memTotal, seeded }

function remember(id, samples) {
  const h = history.get(id) ?? { cpu: [], mem: [], memTotal: 0, last: '' }
  for (const m of samples) {
    if (m.timestamp && m.timestamp <= h.last) continue
    h.last = m.timestamp ?? h.last
    h.cpu.push(m.cpuUsedPct ?? 0)
    h.mem.push(m.memUsed ?? 0)
    h.memTotal = m.memTotal ?? h.memTotal
  }
  h.cpu = h.cpu.slice(-SPARK_POINTS)
  h.mem = h.mem.slice(-SPARK_POINTS)
  history.set(id, h)
  return h
}

async function listSandboxes() {
  const all = []
  let token = ''
  for (let page = 0; page < 20; page++) {
    const q = `state=running,paused&limit=100${token ? `&nextToken=${encodeURIComponent(token)}` : ''}`
    const { data, headers } = await api(`/v2/sandboxes?${q}`)
    all.push(...(data ?? []))
    token = headers.get('x-next-token') ?? ''
    if (!token) break
  }
  return all
}

let lastMetrics = 0

async function refreshSandboxes() {
  const sandboxes = await listSandboxes()
  const tbody = $('#sandboxes tbody')
  const seen = new Set()
  for (const s of sandboxes) {
    seen.add(s.sandboxID)
    let row = tbody.querySelector(`tr[data-sandbox="${CSS.escape(s.sandboxID)}"]`)
    if (!row) {
      row = sandboxRow(s)
      tbody.append(row)
    }
    updateSandboxRow(row, s)
  }
  for (const row of [...tbody.rows]) {
    if (!seen.has(row.dataset.sandbox)) {
      history.delete(row.dataset.sandbox)
      row.remove()
    }
  }
  $('#sandbox-count').textContent = sandboxes.length === 1 ? '1 sandbox' : `${sandboxes.length} sandboxes`
  $('#no-sandboxes').hidden = sandboxes.length > 0
  $('#sandboxes').closest('.table-wrap').hidden = sandboxes.length === 0
  if (Date.now() - lastMetrics > 5000) {
    lastMetrics = Date.now()
    await refreshMetrics(sandboxes.filter((s) => s.state === 'running').map((s) => s.sandboxID))
  }
}

async function refreshMetrics(ids) {
  const fresh = ids.filter((id) => !history.has(id))
  await Promise.all(
    fresh.slice(0, 20).map(async (id) => {
      try {
        const { data } = await api(`/sandboxes/${encodeURIComponent(id)}/metrics`)
        remember(id, data ?? [])
      } catch (e) {
        if (e instanceof Unauthorized) throw e
      }
    })
  )
  for (let i = 0; i < ids.length; i += 100) {
    const batch = ids.slice(i, i + 100).filter((id) => history.has(id))
    if (batch.length === 0) continue
    const { data } = await api(`/sandboxes/metrics?sandbox_ids=${batch.map(encodeURIComponent).join(',')}`)
    const latest = data?.sandboxes ?? data ?? {}
    for (const [id, m] of Object.entries(latest)) if (m) remember(id, [m])
  }
  for (const row of $('#sandboxes tbody').rows) drawSparks(row)
}

function sandboxRow(s) {
  const kill = el('button', { class: 'danger', type: 'button', 'data-action': 'kill' }, 'Kill')
  kill.addEventListener('click', (ev) => {
    ev.stopPropagation()
    killClicked(kill, s.sandboxID)
  })
  const row = el(
    'tr',
    { class: 'clickable', 'data-sandbox': s.sandboxID },
    el('td', { class: 'id' }, s.sandboxID),
    el('td', { class: 'wide' }, s.alias || s.templateID),
    el('td', {}, el('span', { class: 'badge' })),
    el('td', { class: 'age wide' }),
    el('td', { class: 'wide' }, el('div', { class: 'spark-cell cpu' })),
    el('td', { class: 'wide' }, el('div', { class: 'spark-cell mem' })),
    el('td', {}, kill)
  )
  row.addEventListener('click', () => openDetail(s.sandboxID))
  return row
}

function updateSandboxRow(row, s) {
  const badge = row.querySelector('.badge')
  badge.textContent = s.state
  badge.className = `badge ${s.state}`
  row.querySelector('.age').textContent = age(s.startedAt)
  row.dataset.state = s.state
}

function drawSparks(row) {
  const h = history.get(row.dataset.sandbox)
  const cpu = row.querySelector('.spark-cell.cpu')
  const mem = row.querySelector('.spark-cell.mem')
  if (!h || h.cpu.length === 0) {
    cpu.replaceChildren('–')
    mem.replaceChildren('–')
    return
  }
  cpu.replaceChildren(sparkline(h.cpu, 100, 'cpu'), `${h.cpu.at(-1).toFixed(0)}%`)
  mem.replaceChildren(sparkline(h.mem, h.memTotal || Math.max(...h.mem), 'mem'), mib(h.mem.at(-1)))
}

/** First click arms the button, a second within 4 s kills. */
async function killClicked(button, id) {
  if (!button.classList.contains('confirm')) {
    button.classList.add('confirm')
    button.textContent = 'Confirm kill'
    setTimeout(() => {
      button.classList.remove('confirm')
      button.textContent = 'Kill'
    }, 4000)
    return
  }
  button.disabled = true
  try {
    await api(`/sandboxes/${encodeURIComponent(id)}`, { method: 'DELETE' })
    button.closest('tr')?.remove()
    if ($('#detail').dataset.sandbox === id) $('#detail').hidden = true
  } catch (e) {
    button.disabled = false
    button.textContent = 'Kill failed'
    button.title = e.message
  }
}

async function openDetail(id) {
  const box = $('#detail')
  box.dataset.sandbox = id
  box.hidden = false
  $('#detail-title').textContent = id
  const [detail, logs, events] = await Promise.allSettled([
    api(`/sandboxes/${encodeURIComponent(id)}`),
    api(`/v2/sandboxes/${encodeURIComponent(id)}/logs?direction=backward&limit=200`),
    api(`/events/sandboxes/${encodeURIComponent(id)}?limit=50`),
  ])
  const fields = $('#detail-fields')
  fields.replaceChildren()
  if (detail.status === 'fulfilled') {
    const d = detail.value.data
    for (const [k, label] of [
      ['templateID', 'Template'],
      ['state', 'State'],
      ['startedAt', 'Started'],
      ['endAt', 'Ends'],
      ['cpuCount', 'CPUs'],
      ['memoryMB', 'Memory MB'],
      ['diskSizeMB', 'Disk MB'],
      ['envdVersion', 'envd'],
    ]) {
      fields.append(el('dt', {}, label), el('dd', {}, d[k] ?? '–'))
    }
    if (d.metadata && Object.keys(d.metadata).length) {
      fields.append(el('dt', {}, 'Metadata'), el('dd', { class: 'mono' }, JSON.stringify(d.metadata)))
    }
  }
  const lines = logs.status === 'fulfilled' ? [...(logs.value.data?.logs ?? [])].reverse() : []
  $('#detail-logs').textContent = lines.length
    ? lines.map((l) => `${l.timestamp} ${l.level.padEnd(5)} ${l.message}`).join('\n')
    : 'No log lines.'
  renderEvents($('#detail-events'), events.status === 'fulfilled' ? events.value.data ?? [] : [])
}

function renderEvents(list, events) {
  list.replaceChildren()
  if (events.length === 0) list.append(el('li', { class: 'muted' }, 'No events.'))
  for (const e of events) {
    const data = { ...(e.eventData ?? {}) }
    delete data.sandbox_metadata
    delete data.execution
    list.append(
      el(
        'li',
        {},
        el('span', { class: 'type' }, e.type),
        el('span', { class: 'mono' }, e.sandboxId),
        el('span', { class: 'when' }, when(e.timestamp)),
        Object.keys(data).length ? el('span', { class: 'data' }, JSON.stringify(data)) : null
      )
    )
  }
}

// ---- the other views ----

async function refreshEvents() {
  const { data } = await api('/events/sandboxes?limit=50')
  renderEvents($('#events'), data ?? [])
}

async function refreshWebhooks() {
  const [{ data: hooks }, { data: attempts }] = await Promise.all([
    api('/events/webhooks'),
    api('/events/webhooks/deliveries?limit=50'),
  ])
  const names = new Map((hooks ?? []).map((h) => [h.id, h.name]))
  $('#webhooks tbody').replaceChildren(
    ...(hooks ?? []).map((h) =>
      el(
        'tr',
        {},
        el('td', {}, h.name),
        el('td', { class: 'wrap mono' }, h.url),
        el('td', {}, h.enabled ? 'yes' : `no${h.disabledReason ? ` (${h.disabledReason})` : ''}`),
        el('td', { class: 'wrap' }, (h.events ?? []).join(', '))
      )
    )
  )
  $('#no-webhooks').hidden = (hooks ?? []).length > 0
  $('#webhooks').closest('.table-wrap').hidden = (hooks ?? []).length === 0
  $('#deliveries tbody').replaceChildren(
    ...(attempts ?? []).map((a) => {
      const replay = el('button', { class: 'ghost small', type: 'button', 'data-action': 'replay' }, 'Replay')
      replay.addEventListener('click', async () => {
        replay.disabled = true
        try {
          await api(`/events/webhooks/deliveries/${a.deliveryId}/replay`, { method: 'POST' })
          replay.textContent = 'Queued'
        } catch (e) {
          replay.textContent = 'Failed'
          replay.title = e.message
        }
      })
      const result = a.statusCode ? `${a.outcome} (${a.statusCode}, ${a.latencyMs} ms)` : `${a.outcome}${a.error ? `: ${a.error}` : ''}`
      return el(
        'tr',
        {},
        el('td', {}, when(a.timestamp)),
        el('td', {}, names.get(a.webhookId) ?? a.webhookId),
        el('td', {}, a.eventType),
        el('td', { class: 'mono' }, a.deliveryId),
        el('td', { class: 'wrap' }, result),
        el('td', {}, replay)
      )
    })
  )
  $('#no-deliveries').hidden = (attempts ?? []).length > 0
  $('#deliveries').closest('.table-wrap').hidden = (attempts ?? []).length === 0
}

let openTemplate = null
let openBuild = null

async function refreshTemplates() {
  const { data } = await api('/templates')
  $('#templates tbody').replaceChildren(
    ...(data ?? []).map((t) => {
      const row = el(
        'tr',
        { class: 'clickable', 'data-template': t.templateID },
        el('td', { class: 'id' }, t.templateID),
        el('td', {}, (t.names ?? t.aliases ?? []).join(', ')),
        el('td', {}, t.buildStatus ?? '–'),
        el('td', {}, t.cpuCount),
        el('td', {}, `${t.memoryMB} MB`),
        el('td', {}, t.spawnCount ?? 0),
        el('td', {}, when(t.updatedAt))
      )
      row.addEventListener('click', () => {
        openTemplate = t.templateID
        openBuild = null
        refreshBuilds()
      })
      return row
    })
  )
  if (openTemplate) await refreshBuilds()
}

async function refreshBuilds() {
  const box = $('#builds')
  box.hidden = false
  $('#builds-title').textContent = `Builds of ${openTemplate}`
  const { data } = await api(`/templates/${encodeURIComponent(openTemplate)}`)
  const builds = data?.builds ?? []
  $('#builds-list').replaceChildren(
    ...builds.map((b) => {
      const item = el(
        'li',
        { class: 'clickable' },
        el('span', { class: 'type' }, b.status),
        el('span', { class: 'mono' }, b.buildID),
        el('span', { class: 'when' }, when(b.createdAt))
      )
      item.addEventListener('click', () => {
        openBuild = b.buildID
        refreshBuildLog()
      })
      return item
    })
  )
  if (builds.length === 0) $('#builds-list').append(el('li', { class: 'muted' }, 'No builds.'))
  if (openBuild) await refreshBuildLog()
}

async function refreshBuildLog() {
  const log = $('#build-log')
  log.hidden = false
  try {
    const { data } = await api(
      `/templates/${encodeURIComponent(openTemplate)}/builds/${encodeURIComponent(openBuild)}/status?logsOffset=0&limit=100`
    )
    const lines = (data?.logEntries ?? []).map((l) => `${l.timestamp} ${l.level ?? ''} ${l.message}`)
    log.textContent = `${data?.status ?? ''}\n${lines.join('\n')}`
  } catch (e) {
    if (e instanceof Unauthorized) throw e
    log.textContent = e.message
  }
}

async function refreshPool() {
  const { data } = await api('/pool')
  $('#pool tbody').replaceChildren(
    ...(data ?? []).map((p) =>
      el(
        'tr',
        {},
        el('td', {}, p.templateID),
        el('td', {}, p.target),
        el('td', {}, p.ready),
        el('td', {}, p.inUse),
        el('td', {}, p.hits),
        el('td', {}, p.misses),
        el('td', { class: 'wrap' }, p.lastError ?? '–')
      )
    )
  )
}

// The gateway has no audit log yet (`GET /audit/events`, issue 18): said, not requested.
async function refreshAudit() {
  $('#audit').textContent =
    'This gateway keeps no audit log yet: GET /audit/events is not served (it comes with teams and keys).'
}

const refreshers = {
  sandboxes: [refreshSandboxes, 1000],
  events: [refreshEvents, 2000],
  webhooks: [refreshWebhooks, 3000],
  templates: [refreshTemplates, 2000],
  pool: [refreshPool, 2000],
  audit: [refreshAudit, 30000],
}

function show() {
  const name = views.includes(location.hash.slice(1)) ? location.hash.slice(1) : 'sandboxes'
  for (const v of views) $(`#view-${v}`).hidden = v !== name
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.view === name) a.setAttribute('aria-current', 'page')
    else a.removeAttribute('aria-current')
  }
  const [refresh, ms] = refreshers[name]
  poll(refresh, ms)
}

window.addEventListener('hashchange', () => {
  if (!$('#login').hidden) return
  show()
})

$('#login').addEventListener('submit', async (ev) => {
  ev.preventDefault()
  const key = $('#key').value.trim()
  $('#login-error').textContent = ''
  if (await signIn(key)) $('#key').value = ''
})
$('#signout').addEventListener('click', () => signOut(''))
$('#detail-close').addEventListener('click', () => {
  $('#detail').hidden = true
})

refreshHealth()
setInterval(refreshHealth, 5000)
// With a key from earlier in this tab, straight in; otherwise ask (a gateway without keys
// takes any).
if (sessionStorage.getItem(KEY)) signIn(sessionStorage.getItem(KEY))
else signOut('')
