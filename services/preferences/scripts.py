"""Lua scripts of the preference queue: each runs atomically inside Redis, so no two clients ever see a
pair half-moved (labelled but still unlabelled, acked but not marked used).

Every script gets the queue's key prefix as ARGV[1] and derives its keys from it:
``meta`` (hash: format, max_len, epoch, counters), ``unlabelled`` and ``labelled`` (streams; consumer
groups ``judges`` and ``learners``), ``status`` (hash: pair id -> ``u <entry>`` unlabelled, ``l <entry>``
labelled, ``d <epoch>`` used and acked), ``used:<epoch>`` (set of pair ids acked in that epoch).
Errors are ``RLFLEET_<WHAT> ...`` replies that the client turns into PreferenceErrors.
"""

from __future__ import annotations

# Shared head: key names, and a refusal when the queue was dropped under a client.
_HEAD = """
local p = ARGV[1]
local meta, U, L, S = p .. 'meta', p .. 'unlabelled', p .. 'labelled', p .. 'status'
if redis.call('EXISTS', meta) == 0 then return redis.error_reply('RLFLEET_NOQUEUE') end
"""

# ARGV: prefix, format, max_len. Creates the queue unless it exists; returns the stored max_len.
CREATE = """
local p = ARGV[1]
local meta, U, L = p .. 'meta', p .. 'unlabelled', p .. 'labelled'
if redis.call('HSETNX', meta, 'format', ARGV[2]) == 1 then
  redis.call('HSET', meta, 'max_len', ARGV[3], 'epoch', '0')
  for _, sg in ipairs({{U, 'judges'}, {L, 'learners'}}) do
    if redis.call('EXISTS', sg[1]) == 0 then
      redis.call('XGROUP', 'CREATE', sg[1], sg[2], '0', 'MKSTREAM')
    end
  end
end
return redis.call('HMGET', meta, 'format', 'max_len')
"""

# ARGV: prefix, kind ('u' unlabelled / 'l' labelled), epoch ('' = current), n,
#       then n times: pair id, pair JSON [, label JSON when kind is 'l'].
# All or nothing: errors on any pair id already in the queue (or already used in that epoch), then
# refuses the whole batch ({0, unconsumed}) when it does not fit under max_len.
ADD = _HEAD + """
local labelled = ARGV[2] == 'l'
local n = tonumber(ARGV[4])
local epoch = ARGV[3]
if epoch == '' then epoch = redis.call('HGET', meta, 'epoch') end
local step = labelled and 3 or 2
for i = 0, n - 1 do
  local pid = ARGV[5 + i * step]
  local st = redis.call('HGET', S, pid)
  -- a used pair may come back labelled for another epoch (a second pass over a dataset)
  if st and (not labelled or string.sub(st, 1, 1) ~= 'd') then
    return redis.error_reply('RLFLEET_DUPLICATE ' .. pid .. ' ' .. st)
  end
  if labelled and redis.call('SISMEMBER', p .. 'used:' .. epoch, pid) == 1 then
    return redis.error_reply('RLFLEET_USED ' .. pid .. ' ' .. epoch)
  end
end
-- only a batch that would be accepted waits for room: the checks above come first
local total = redis.call('XLEN', U) + redis.call('XLEN', L)
if total + n > tonumber(redis.call('HGET', meta, 'max_len')) then return {0, total} end
local ids = {}
for i = 0, n - 1 do
  local pid = ARGV[5 + i * step]
  local id
  if labelled then
    id = redis.call('XADD', L, '*', 'pair', ARGV[6 + i * step], 'label', ARGV[7 + i * step], 'epoch', epoch)
    redis.call('HSET', S, pid, 'l ' .. id)
  else
    id = redis.call('XADD', U, '*', 'pair', ARGV[6 + i * step])
    redis.call('HSET', S, pid, 'u ' .. id)
  end
  ids[#ids + 1] = id
end
redis.call('HINCRBY', meta, 'added', n)
if labelled then redis.call('HINCRBY', meta, 'labelled', n) end
return {1, ids}
"""

# ARGV: prefix, consumer, min_idle_ms (-1: take nothing from others), count.
# Hands `consumer` up to `count` unlabelled pairs: first those another judge (or person) holds idle
# longer than min_idle_ms (an expired lease, a crashed judge), then never-delivered ones.
LEASE = _HEAD + """
local consumer, min_idle, count = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local got = {}
if min_idle >= 0 then
  local cursor = '0-0'
  repeat
    local r = redis.call('XAUTOCLAIM', U, 'judges', consumer, min_idle, cursor, 'COUNT', count - #got)
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      if e then got[#got + 1] = e end  -- Redis 6.2 answers nil for a deleted entry
    end
  until cursor == '0-0' or #got >= count
  if #got > 0 then redis.call('HINCRBY', meta, 'leases_expired', #got) end
end
if #got < count then
  local r = redis.call('XREADGROUP', 'GROUP', 'judges', consumer, 'COUNT', count - #got, 'STREAMS', U, '>')
  if r then
    for _, e in ipairs(r[1][2]) do got[#got + 1] = e end
  end
end
return got
"""

# ARGV: prefix, n, then n times: pair id, label JSON. Per pair: the labelled entry id, or
# 'missing' (no such pair) or 'labelled' (it already has a label: the first label wins).
LABEL = _HEAD + """
local epoch = redis.call('HGET', meta, 'epoch')
local n, done, out = tonumber(ARGV[2]), 0, {}
for i = 0, n - 1 do
  local pid, label = ARGV[3 + i * 2], ARGV[4 + i * 2]
  local st = redis.call('HGET', S, pid)
  if not st then
    out[#out + 1] = 'missing'
  elseif string.sub(st, 1, 2) ~= 'u ' then
    out[#out + 1] = 'labelled'
  else
    local uid = string.sub(st, 3)
    local e = redis.call('XRANGE', U, uid, uid)
    local pair
    if #e == 1 then
      local f = e[1][2]
      for j = 1, #f, 2 do if f[j] == 'pair' then pair = f[j + 1] end end
    end
    if not pair then
      out[#out + 1] = 'missing'
    else
      local lid = redis.call('XADD', L, '*', 'pair', pair, 'label', label, 'epoch', epoch)
      redis.call('XACK', U, 'judges', uid)
      redis.call('XDEL', U, uid)
      redis.call('HSET', S, pid, 'l ' .. lid)
      done = done + 1
      out[#out + 1] = lid
    end
  end
end
if done > 0 then redis.call('HINCRBY', meta, 'labelled', done) end
return out
"""

# ARGV: prefix, consumer, min_idle_ms, count. A learner takes over up to `count` labelled pairs that
# another learner read and left unacknowledged for longer than min_idle_ms (it crashed or stalls).
# Pairs whose id is already in their epoch's used set are acknowledged away, never handed out again.
RECLAIM = _HEAD + """
local consumer, min_idle, count = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local got, dup, cursor = {}, 0, '0-0'
repeat
  local r = redis.call('XAUTOCLAIM', L, 'learners', consumer, min_idle, cursor, 'COUNT', count - #got)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    if e then
      local f, pair, epoch = e[2], nil, nil
      for j = 1, #f, 2 do
        if f[j] == 'pair' then pair = f[j + 1] elseif f[j] == 'epoch' then epoch = f[j + 1] end
      end
      local ok, obj = pcall(cjson.decode, pair or '')
      local pid = ok and type(obj) == 'table' and obj['id'] or nil
      if pid and epoch and redis.call('SISMEMBER', p .. 'used:' .. epoch, pid) == 1 then
        redis.call('XACK', L, 'learners', e[1])
        redis.call('XDEL', L, e[1])
        dup = dup + 1
      else
        got[#got + 1] = e  -- undecodable entries go to the client, which dead-letters them
      end
    end
  end
until cursor == '0-0' or #got >= count
if #got > 0 then redis.call('HINCRBY', meta, 'reclaimed', #got) end
if dup > 0 then redis.call('HINCRBY', meta, 'duplicates', dup) end
return got
"""

# ARGV: prefix, consumer, mode ('claim' or 'ack'), n, then n times: entry id, pair id, epoch.
# Per entry: 'not_owned' when the entry is no longer pending for this consumer (another learner
# reclaimed it, or it was acked already), 'duplicate' when the pair is already in its epoch's used
# set (then it is acknowledged away), else 'ok'. 'claim' resets the entry's idle time (so no other
# learner reclaims it during the update); 'ack' acknowledges and deletes it and marks the pair used.
SETTLE = _HEAD + """
local consumer, mode, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local out, acked, dup, lost = {}, 0, 0, 0
for i = 0, n - 1 do
  local id, pid, epoch = ARGV[5 + i * 3], ARGV[6 + i * 3], ARGV[7 + i * 3]
  local pe = redis.call('XPENDING', L, 'learners', id, id, 1)
  local used = p .. 'used:' .. epoch
  if #pe == 0 or pe[1][2] ~= consumer then
    out[#out + 1] = 'not_owned'
    lost = lost + 1
  elseif redis.call('SISMEMBER', used, pid) == 1 then
    redis.call('XACK', L, 'learners', id)
    redis.call('XDEL', L, id)
    out[#out + 1] = 'duplicate'
    dup = dup + 1
  elseif mode == 'claim' then
    redis.call('XCLAIM', L, 'learners', consumer, 0, id, 'JUSTID')
    out[#out + 1] = 'ok'
  else
    redis.call('SADD', used, pid)
    redis.call('XACK', L, 'learners', id)
    redis.call('XDEL', L, id)
    redis.call('HSET', S, pid, 'd ' .. epoch)
    out[#out + 1] = 'ok'
    acked = acked + 1
  end
end
if acked > 0 then redis.call('HINCRBY', meta, 'acked', acked) end
if dup > 0 then redis.call('HINCRBY', meta, 'duplicates', dup) end
if lost > 0 and mode == 'ack' then redis.call('HINCRBY', meta, 'ack_not_owned', lost) end
return out
"""

# ARGV: prefix, stream ('unlabelled'/'labelled'), group, entry id, reason. Moves an entry that does
# not decode into the ``dead`` stream (kept for inspection, counted), out of the way of consumers.
DEAD_LETTER = _HEAD + """
local src = p .. ARGV[2]
local e = redis.call('XRANGE', src, ARGV[4], ARGV[4])
local fields = {'source', ARGV[2], 'entry', ARGV[4], 'reason', ARGV[5]}
if #e == 1 then
  for _, v in ipairs(e[1][2]) do fields[#fields + 1] = v end
end
redis.call('XADD', p .. 'dead', '*', unpack(fields))
redis.call('XACK', src, ARGV[3], ARGV[4])
redis.call('XDEL', src, ARGV[4])
redis.call('HINCRBY', meta, 'dead', 1)
return 1
"""
