"""The Lua scripts behind every SessionStore write. Each runs atomically inside Redis and is idempotent,
so a client that lost a reply (connection dropped, server restarted) can simply run it again.

Time comes from the server's clock (`TIME`), never the client's, so orchestrators with skewed clocks
agree on when a lease expires. Every script answers `{code, ...}`: "ok" or a reason ("not_found",
"lease_lost", "finished", "dup", "gap", "no_intent", "exists") that `store.py` turns into a result or
an exception.

Deliberately not here: key naming, argument validation, JSON encoding of steps (all in Python).
"""

from __future__ import annotations

# Shared helpers, prepended to every script (other modules' scripts too: `PRELUDE`).
_PRELUDE = r"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local TERMINAL = {completed = true, failed = true, cancelled = true}
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x) return string.format('%d', x) end
-- nil when `owner` holds a live lease on the session with fencing `token`, else {code, reason}.
local function lease_problem(state_key, owner, token, now)
  local f = redis.call('HMGET', state_key, 'fencing_token', 'lease_owner', 'lease_expires_ms', 'status')
  if not f[1] then return {'not_found'} end
  if tonumber(f[1]) ~= tonumber(token) then
    return {'lease_lost', 'stale fencing token ' .. token .. ' (current ' .. f[1] .. ')'}
  end
  if TERMINAL[f[4]] then return {'finished', f[4]} end
  if f[2] ~= owner then return {'lease_lost', 'lease held by ' .. tostring(f[2]) .. ', not ' .. owner} end
  if not f[3] or tonumber(f[3]) <= now then return {'lease_lost', 'lease expired'} end
  return nil
end
"""

PRELUDE = _PRELUDE

# A new pending session's state hash, indexed in its tenant's sessions and the runnable set; `extra` holds
# (field, value) pairs set once at creation (thread_id, context). Indexes are scored by a creation
# sequence number, so "newest first" is exact even within a millisecond. Returns the creation time (ms).
CREATE_SESSION = r"""
local function create_session(state, tenant_index, runnable, seq_key, id, tenant, agent, task, extra)
  local now = now_ms()
  redis.call('HSET', state, 'session_id', id, 'tenant', tenant, 'agent', agent, 'task', task,
    'status', 'pending', 'step_count', '0', 'fencing_token', '0', 'summarized_through', '0',
    'created_ms', int(now), 'updated_ms', int(now))
  for i = 1, #extra - 1, 2 do redis.call('HSET', state, extra[i], extra[i + 1]) end
  local seq = redis.call('INCR', seq_key)
  redis.call('ZADD', tenant_index, seq, id)
  redis.call('ZADD', runnable, seq, id)
  return now
end
"""

# KEYS: state, tenant_index, runnable, creation_seq. ARGV: session_id, tenant, agent, task, then optional
# (field, value) pairs (see create_session).
CREATE = _PRELUDE + CREATE_SESSION + r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', redis.call('HGETALL', KEYS[1])} end
create_session(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], {unpack(ARGV, 5)})
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: state. ARGV: owner, lease_ms.
# Free, expired or someone else's expired lease -> new acquisition (fencing token + 1); our live lease ->
# extended with the same token; someone else's live lease -> lease_lost.
CLAIM = _PRELUDE + r"""
local f = redis.call('HMGET', KEYS[1], 'status', 'lease_owner', 'lease_expires_ms')
if not f[1] then return {'not_found'} end
if TERMINAL[f[1]] then return {'finished', f[1]} end
local now = now_ms()
local live = f[3] and tonumber(f[3]) > now
if live and f[2] ~= ARGV[1] then
  return {'lease_lost', 'lease held by ' .. f[2] .. ' for another ' .. int(tonumber(f[3]) - now) .. ' ms'}
end
if not live then
  redis.call('HINCRBY', KEYS[1], 'fencing_token', 1)
  redis.call('HSET', KEYS[1], 'lease_owner', ARGV[1])
end
redis.call('HSET', KEYS[1], 'lease_expires_ms', int(now + tonumber(ARGV[2])), 'updated_ms', int(now))
if f[1] == 'pending' then redis.call('HSET', KEYS[1], 'status', 'running') end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: state. ARGV: owner, token, lease_ms.
HEARTBEAT = _PRELUDE + r"""
local now = now_ms()
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2], now)
if problem then return problem end
redis.call('HSET', KEYS[1], 'lease_expires_ms', int(now + tonumber(ARGV[3])))
return {'ok', int(now + tonumber(ARGV[3]))}
"""

# KEYS: state. ARGV: owner, token. Releasing a lease one no longer holds is a no-op.
RELEASE = _PRELUDE + r"""
local f = redis.call('HMGET', KEYS[1], 'fencing_token', 'lease_owner')
if not f[1] then return {'not_found'} end
if tonumber(f[1]) ~= tonumber(ARGV[2]) or f[2] ~= ARGV[1] then return {'noop'} end
redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_expires_ms')
redis.call('HSET', KEYS[1], 'updated_ms', int(now_ms()))
return {'ok'}
"""

# KEYS: state, steps, runnable, events, tools, tenant_index, tenant_finished.
# ARGV: owner, token, index, step_json, patch_json, finished_ttl_ms, event_maxlen, committed_event_json,
#       terminal_event_type, terminal_event_json, session_id, redundant tool-record fields (JSON list),
#       transient event ids (JSON list): both deleted with the commit (the step log now holds their payloads).
# Order of checks: stale token (lease_lost) before "already committed" (dup), so a superseded owner learns
# at once; a retry by the current token holder is a no-op even after its final commit released the lease.
APPEND_STEP = _PRELUDE + r"""
local f = redis.call('HMGET', KEYS[1], 'fencing_token', 'step_count')
if not f[1] then return {'not_found'} end
if tonumber(f[1]) ~= tonumber(ARGV[2]) then
  return {'lease_lost', 'stale fencing token ' .. ARGV[2] .. ' (current ' .. f[1] .. ')'}
end
local count, index = tonumber(f[2]), tonumber(ARGV[3])
if index < count then return {'dup', count} end
local now = now_ms()
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2], now)
if problem then return problem end
if index > count then return {'gap', count} end
redis.call('RPUSH', KEYS[2], ARGV[4])
local redundant, transient = cjson.decode(ARGV[12]), cjson.decode(ARGV[13])
if #redundant > 0 then redis.call('HDEL', KEYS[5], unpack(redundant)) end
if #transient > 0 then redis.call('XDEL', KEYS[4], unpack(transient)) end
redis.call('HSET', KEYS[1], 'step_count', int(count + 1), 'updated_ms', int(now))
local patch = cjson.decode(ARGV[5])
for name, value in pairs(patch) do
  if value == cjson.null then redis.call('HDEL', KEYS[1], name)
  elseif type(value) == 'number' then redis.call('HSET', KEYS[1], name, int(value))
  else redis.call('HSET', KEYS[1], name, value) end
end
local maxlen = ARGV[7]
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', 'type', 'step_committed', 'data', ARGV[8])
if patch.status and TERMINAL[patch.status] then
  redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_expires_ms')
  redis.call('ZREM', KEYS[3], ARGV[11])
  id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', 'type', ARGV[9], 'data', ARGV[10])
  local ttl = tonumber(ARGV[6])
  if ttl > 0 then
    for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4], KEYS[5]}) do redis.call('PEXPIRE', key, ttl) end
    redis.call('ZADD', KEYS[7], now + ttl, ARGV[11])
    -- prune the tenant index of sessions whose keys have expired (a bounded amount per finish)
    for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, 100)) do
      redis.call('ZREM', KEYS[6], gone)
      redis.call('ZREM', KEYS[7], gone)
    end
  end
end
return {'ok', count + 1, id}
"""

# KEYS: state, tools. ARGV: owner, token, idempotency_key, intent_json. The first intent recorded wins.
TOOL_INTENT = _PRELUDE + r"""
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2], now_ms())
if problem then return problem end
redis.call('HSETNX', KEYS[2], 'intent:' .. ARGV[3], ARGV[4])
return {'ok', redis.call('HGET', KEYS[2], 'intent:' .. ARGV[3])}
"""

# KEYS: state, tools. ARGV: owner, token, idempotency_key, result_json. The first result recorded wins.
TOOL_RESULT = _PRELUDE + r"""
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2], now_ms())
if problem then return problem end
if redis.call('HEXISTS', KEYS[2], 'intent:' .. ARGV[3]) == 0 then return {'no_intent'} end
redis.call('HSETNX', KEYS[2], 'result:' .. ARGV[3], ARGV[4])
return {'ok', redis.call('HGET', KEYS[2], 'result:' .. ARGV[3])}
"""

# KEYS: state, events. ARGV: type, data_json, maxlen, nonce, retrying ('1' after a connection error).
# A retry first looks for its nonce among the newest entries, so a lost reply does not double the event.
# Events of a finished session expire with it.
EMIT = _PRELUDE + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
if ARGV[5] == '1' then
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 256)) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'nonce' and fields[i + 1] == ARGV[4] then return {'ok', entry[1]} end
    end
  end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[1], 'data', ARGV[2],
  'nonce', ARGV[4])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {'ok', id}
"""

# KEYS: runnable. ARGV: limit, state-key prefix, state-key suffix, how many entries to scan at most.
# Ids of sessions, oldest first, that are pending or running with no live lease (their owner died).
RUNNABLE = _PRELUDE + r"""
local now, found, limit = now_ms(), {}, tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[4]) - 1)) do
  local f = redis.call('HMGET', ARGV[2] .. id .. ARGV[3], 'status', 'lease_expires_ms')
  if (f[1] == 'pending' or f[1] == 'running') and (not f[2] or tonumber(f[2]) <= now) then
    found[#found + 1] = id
    if #found >= limit then break end
  end
end
return found
"""
