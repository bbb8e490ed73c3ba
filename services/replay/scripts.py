"""The Lua scripts that do every table operation inside Redis, atomically (one EVALSHA per call).

Redis runs a script to completion with no other command in between, so a script that checks the
rate limiter, writes records, updates the sum-tree and bumps the counters is all-or-nothing as seen
by every other client. Scripts validate everything (table id, lengths, capacity, limiter) *before*
their first write, because Redis does not roll back a script that fails half way.

Keys (prefix ``P = rlfleet:<namespace>:<table>:``)::

    P..'schema'        JSON: schema + options + layout + table_id (read by clients on open)
    P..'state'         hash: the layout and options the scripts need, and the counters
    P..'tree'          string: the priority sum-tree, float64 little-endian nodes (prioritised only)
    P..'data:<c>'      string: chunk c of the record ring, `slots_per_chunk` fixed-size records

The record ring: item number k (k = 0, 1, 2, ... in insertion order; the item's *key*) lives in
slot ``k % capacity``, chunk ``slot // slots_per_chunk`` at byte ``(slot % slots_per_chunk) *
record_size``. Live items are keys ``head <= k < tail``: `tail` counts inserts, `head` moves on when
the FIFO remover overwrites the oldest items and when the FIFO sampler hands items out. Keys travel
as float64 (exact below 2**53) because Lua numbers are doubles.

The sum-tree: level 0 holds one leaf per slot (priority ** alpha, 0 for an empty slot), level l+1
one node per `fanout` nodes of level l holding their sum, up to a single root (the total). All
levels are concatenated in one string. A fan-out of 16 keeps the tree shallow (5 levels for 1M
slots): sampling reads one 128-byte block per level (a block several descents of one batch pass
through, e.g. the root's children, is read once), an update re-sums the changed nodes' parents
level by level (each parent is recomputed from its children, so no rounding drift accumulates).

Random numbers come from the client (ARGV, float64 in [0, 1)), not from Lua's `math.random`, so a
seeded client samples reproducibly and scripts stay deterministic for replication/AOF.

The data chunk keys are built inside the scripts from the prefix (only the state and tree keys are
declared in KEYS), which standalone Redis allows; Redis Cluster would need the table's keys in one
hash slot (a ``{...}`` hash tag in the prefix) and is not supported here.

Scripts reply with an error string starting ``RLFLEET_<CODE>`` that the client maps to an exception;
a rate-limited call replies ``{0, reason}`` (nothing written) and the client waits and retries.
"""

from __future__ import annotations

# Shared prologue: load and check the table state. KEYS[1] = state hash, KEYS[2] = tree;
# ARGV[1] = key prefix, ARGV[2] = table id the client opened.
_PROLOGUE = r"""
local STATE, TREE, PREFIX = KEYS[1], KEYS[2], ARGV[1]
local st = redis.call('HMGET', STATE, 'table_id', 'capacity', 'record_size', 'slots_per_chunk', 'sampler',
  'alpha', 'fanout', 'min_size', 'spi', 'min_diff', 'max_diff', 'head', 'tail', 'samples', 'max_priority')
if not st[1] then return redis.error_reply('RLFLEET_NOTABLE table does not exist') end
if st[1] ~= ARGV[2] then return redis.error_reply('RLFLEET_STALE table was dropped and created again') end
local cap, rs, spc = tonumber(st[2]), tonumber(st[3]), tonumber(st[4])
local sampler, alpha, F = st[5], tonumber(st[6]), tonumber(st[7])
local min_size, spi, min_diff, max_diff = tonumber(st[8]), tonumber(st[9]), tonumber(st[10]), tonumber(st[11])
local head, tail, samples, max_priority = tonumber(st[12]), tonumber(st[13]), tonumber(st[14]), tonumber(st[15])
local size = tail - head

local function data_key(chunk) return PREFIX .. 'data:' .. chunk end

-- Call fn(chunk, byte_offset, count, done) for each run of consecutive slots holding keys
-- first .. first+n-1 that lie in one chunk (a run ends at a chunk end and at the ring's end).
local function runs(first, n, fn)
  local done = 0
  while done < n do
    local slot = (first + done) % cap
    local in_chunk = slot % spc
    local cnt = math.min(n - done, spc - in_chunk, cap - slot)
    fn(math.floor(slot / spc), in_chunk * rs, cnt, done)
    done = done + cnt
  end
end

-- Rate limiter, as Reverb's RateLimiter::CanInsert / CanSample (spi = samples per insert, nil = off).
local function insert_blocker(n)
  if spi == nil then return nil end
  if size + n <= min_size then return nil end  -- until min size is reached inserts are free
  if (tail + n) * spi - samples > max_diff then return 'samples_per_insert' end
  return nil
end
local function sample_blocker(b)
  if size < math.max(min_size, 1) then return 'min_size' end
  if sampler == 'fifo' and size < b then return 'fifo_size' end
  if spi ~= nil and tail * spi - samples - b < min_diff then return 'samples_per_insert' end
  return nil
end

-- Sum-tree geometry: sizes[l] nodes at level l, stored from node offset offs[l]; level `top` is the root.
local function tree_levels()
  local sizes, offs = {}, {}
  local n, off, l = cap, 0, 0
  while true do
    sizes[l], offs[l] = n, off
    if n == 1 then return sizes, offs, l end
    off = off + n
    n = math.ceil(n / F)
    l = l + 1
  end
end
local DFMT = {}  -- DFMT[c] = struct format of c little-endian doubles ('<dd...')
for c = 1, F do DFMT[c] = '<' .. string.rep('d', c) end
local function read_nodes(off, cnt)
  local s = redis.call('GETRANGE', TREE, off * 8, (off + cnt) * 8 - 1)
  if #s ~= cnt * 8 then error('RLFLEET_CORRUPT priority tree is shorter than the table') end
  local t = {struct.unpack(DFMT[cnt], s)}  -- cnt doubles, then the next position (ignored)
  t[cnt + 1] = nil
  return t
end
-- Re-sum the ancestors of the given leaves, level by level, each parent once.
local function fix_parents(leaves)
  local sizes, offs, top = tree_levels()
  local cur = leaves
  for l = 1, top do
    local seen, parents = {}, {}
    for _, i in ipairs(cur) do
      local p = math.floor(i / F)
      if not seen[p] then seen[p] = true; parents[#parents + 1] = p end
    end
    for _, p in ipairs(parents) do
      local first = p * F
      local cnt = math.min(F, sizes[l - 1] - first)
      local vals = read_nodes(offs[l - 1] + first, cnt)
      local sum = 0
      for i = 1, cnt do sum = sum + vals[i] end
      redis.call('SETRANGE', TREE, (offs[l] + p) * 8, struct.pack('<d', sum))
    end
    cur = parents
  end
end
local function fmt(x) return string.format('%.17g', x) end
"""

# ARGV[3] = n records, ARGV[4] = n * record_size bytes, ARGV[5] = n float64 priorities or '' (use the max).
# Reply {1, first key} or {0, reason}.
INSERT = (
    _PROLOGUE
    + r"""
local n, data, prios = tonumber(ARGV[3]), ARGV[4], ARGV[5]
if #data ~= n * rs then
  return redis.error_reply('RLFLEET_LAYOUT got ' .. #data .. ' bytes for ' .. n .. ' records of ' .. rs)
end
if n > cap then return redis.error_reply('RLFLEET_TOOBIG batch of ' .. n .. ' > max_size ' .. cap) end
if prios ~= '' and #prios ~= n * 8 then return redis.error_reply('RLFLEET_LAYOUT priorities length') end
local blocker = insert_blocker(n)
if blocker then return {0, blocker} end

local evict = math.max(0, size + n - cap)  -- FIFO remover: the oldest items make room
runs(tail, n, function(chunk, off, cnt, done)
  redis.call('SETRANGE', data_key(chunk), off, string.sub(data, done * rs + 1, (done + cnt) * rs))
end)

if sampler == 'prioritized' then
  local leaves, touched = {}, {}
  for i = 1, n do
    local p = max_priority
    if prios ~= '' then
      p = struct.unpack('<d', prios, (i - 1) * 8 + 1)
      if p > max_priority then max_priority = p end
    end
    leaves[i] = struct.pack('<d', p ^ alpha)
  end
  local done = 0
  while done < n do  -- the leaf level is one array of `cap` doubles: split only where the ring wraps
    local slot = (tail + done) % cap
    local cnt = math.min(n - done, cap - slot)
    redis.call('SETRANGE', TREE, slot * 8, table.concat(leaves, '', done + 1, done + cnt))
    for j = 0, cnt - 1 do touched[#touched + 1] = slot + j end
    done = done + cnt
  end
  fix_parents(touched)
  redis.call('HSET', STATE, 'max_priority', fmt(max_priority))
end

redis.call('HSET', STATE, 'head', head + evict, 'tail', tail + n)
redis.call('HINCRBY', STATE, 'insert_calls', 1)
if evict > 0 then redis.call('HINCRBY', STATE, 'evicted', evict) end
return {1, tail}
"""
)

# ARGV[3] = b, ARGV[4] = b float64 uniforms in [0, 1). Reply {1, records, keys, probabilities, size} or {0, reason}.
SAMPLE = (
    _PROLOGUE
    + r"""
local b, us = tonumber(ARGV[3]), ARGV[4]
if #us ~= b * 8 then return redis.error_reply('RLFLEET_LAYOUT uniforms length') end
local blocker = sample_blocker(b)
if blocker then return {0, blocker} end

local recs, keys, probs = {}, {}, {}
local function read_slot(slot)
  local off = (slot % spc) * rs
  local rec = redis.call('GETRANGE', data_key(math.floor(slot / spc)), off, off + rs - 1)
  if #rec ~= rs then error('RLFLEET_CORRUPT record of slot ' .. slot .. ' is missing') end
  return rec
end

if sampler == 'fifo' then
  runs(head, b, function(chunk, off, cnt, done)
    local s = redis.call('GETRANGE', data_key(chunk), off, off + cnt * rs - 1)
    if #s ~= cnt * rs then error('RLFLEET_CORRUPT records are missing') end
    recs[#recs + 1] = s
  end)
  local one = struct.pack('<d', 1)
  for i = 1, b do keys[i] = struct.pack('<d', head + i - 1); probs[i] = one end
  redis.call('HSET', STATE, 'head', head + b)
  redis.call('HINCRBY', STATE, 'consumed', b)
elseif sampler == 'uniform' then
  local p = struct.pack('<d', 1 / size)
  for i = 1, b do
    local k = head + math.floor(struct.unpack('<d', us, (i - 1) * 8 + 1) * size)
    if k >= tail then k = tail - 1 end
    recs[i] = read_slot(k % cap)
    keys[i] = struct.pack('<d', k)
    probs[i] = p
  end
else  -- prioritized: descend the sum-tree from the root for each target u * total
  local sizes, offs, top = tree_levels()
  local total = read_nodes(offs[top], 1)[1]
  local blocks = {}  -- node blocks read so far (the upper levels are shared by most descents)
  if not (total > 0) then return redis.error_reply('RLFLEET_ZEROPRIO all priorities are zero') end
  for i = 1, b do
    local target = struct.unpack('<d', us, (i - 1) * 8 + 1) * total
    local idx, value = 0, total
    for l = top, 1, -1 do
      local first = idx * F
      local at = offs[l - 1] + first
      local vals = blocks[at]
      if not vals then
        vals = read_nodes(at, math.min(F, sizes[l - 1] - first))
        blocks[at] = vals
      end
      local chosen, last = nil, nil
      for c = 1, #vals do
        local v = vals[c]
        if v > 0 then
          last = c
          if target < v then chosen = c; break end
          target = target - v
        end
      end
      if chosen == nil then chosen = last; target = vals[last] * 0.5 end  -- rounding at the right edge
      idx, value = first + chosen - 1, vals[chosen]
    end
    local k = tail - 1 - ((tail - 1 - idx) % cap)  -- the live key stored in slot idx
    recs[i] = read_slot(idx)
    keys[i] = struct.pack('<d', k)
    probs[i] = struct.pack('<d', value / total)
  end
end
redis.call('HINCRBY', STATE, 'samples', b)
redis.call('HINCRBY', STATE, 'sample_calls', 1)
return {1, table.concat(recs), table.concat(keys), table.concat(probs), size}
"""
)

# ARGV[3] = m float64 keys, ARGV[4] = m float64 priorities. Keys no longer live are skipped. Reply: updated count.
UPDATE_PRIORITIES = (
    _PROLOGUE
    + r"""
local ks, ps = ARGV[3], ARGV[4]
if sampler ~= 'prioritized' then return redis.error_reply('RLFLEET_NOPRIO table has no priorities') end
if #ks ~= #ps or #ks % 8 ~= 0 then return redis.error_reply('RLFLEET_LAYOUT keys/priorities length') end
local touched = {}
for i = 1, #ks / 8 do
  local k = struct.unpack('<d', ks, (i - 1) * 8 + 1)
  if k >= head and k < tail then
    local p = struct.unpack('<d', ps, (i - 1) * 8 + 1)
    if p > max_priority then max_priority = p end
    local slot = k % cap
    redis.call('SETRANGE', TREE, slot * 8, struct.pack('<d', p ^ alpha))
    touched[#touched + 1] = slot
  end
end
if #touched > 0 then
  fix_parents(touched)
  redis.call('HSET', STATE, 'max_priority', fmt(max_priority))
  redis.call('HINCRBY', STATE, 'priority_updates', #touched)
end
return #touched
"""
)

# ARGV[3] = m float64 keys. Reply: the m records, in order, or 'RLFLEET_GONE <key> <head> <tail>' for the first
# key that is not live.
# A read by key is not a sample: it moves no counter and the rate limiter does not apply.
GET = (
    _PROLOGUE
    + r"""
local ks = ARGV[3]
if #ks % 8 ~= 0 then return redis.error_reply('RLFLEET_LAYOUT keys length') end
local recs = {}
for i = 1, #ks / 8 do
  local k = struct.unpack('<d', ks, (i - 1) * 8 + 1)
  if k < head or k >= tail then
    return redis.error_reply('RLFLEET_GONE ' .. fmt(k) .. ' ' .. fmt(head) .. ' ' .. fmt(tail))
  end
  local slot = k % cap
  local off = (slot % spc) * rs
  local rec = redis.call('GETRANGE', data_key(math.floor(slot / spc)), off, off + rs - 1)
  if #rec ~= rs then error('RLFLEET_CORRUPT record of key ' .. fmt(k) .. ' is missing') end
  recs[i] = rec
end
return table.concat(recs)
"""
)

# ARGV[3] = 'insert' | 'sample', ARGV[4] = n. Reply: '' when allowed now, else the reason. Writes nothing.
CHECK = (
    _PROLOGUE
    + r"""
local n = tonumber(ARGV[4])
local blocker
if ARGV[3] == 'insert' then blocker = insert_blocker(n) else blocker = sample_blocker(n) end
return blocker or ''
"""
)

# KEYS[1] = schema key, KEYS[2] = state, KEYS[3] = tree, KEYS[4] = the namespace's table set.
# ARGV[1] = table name, ARGV[2] = schema JSON, ARGV[3] = tree nodes (0: no tree), ARGV[4..] = state field/value.
# Reply {1, json} when created, {0, stored json} when the table already existed (nothing written).
CREATE = r"""
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
local nodes = tonumber(ARGV[3])
if nodes > 0 then redis.call('SETRANGE', KEYS[3], nodes * 8 - 1, '\0') end  -- all-zero tree
redis.call('SADD', KEYS[4], ARGV[1])
return {1, ARGV[2]}
"""
