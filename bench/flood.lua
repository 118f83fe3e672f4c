-- wrk script (LuaJIT, Lua 5.1: no bit operators): a flood of distinct made-up tokens ("bad-flood-<n>", n = 1..$FLOOD_TOKENS, in a
-- shuffled order per connection), each unknown to the gateway the first time it is seen.
local n = tonumber(os.getenv("FLOOD_TOKENS") or "5000")
local i = 0
local offset = 0
local prefix = os.getenv("FLOOD_PREFIX") or "x"
setup = function(thread)
  thread:set("seed", math.random(1, 1000000))
end
init = function()
  math.randomseed(seed or os.time())
  offset = math.random(0, n - 1)
end
-- $FLOOD_SPREAD=1: each made-up token comes from its own address (X-Forwarded-For).
local spread = os.getenv("FLOOD_SPREAD") == "1"
-- $FLOOD_TOKEN instead: every request carries that one token (the control runs).
local fixed = os.getenv("FLOOD_TOKEN")
request = function()
  if fixed then
    return wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. fixed })
  end
  i = i + 1
  local t = (offset + i * 7919) % n + 1
  local headers = { ["Authorization"] = "Bearer bad-flood-" .. prefix .. "-" .. t }
  if spread then
    -- One client address per token (10.0.0.0/8), as a trusted proxy would report it.
    headers["X-Forwarded-For"] = string.format("10.%d.%d.%d",
      math.floor(t / 65536) % 256, math.floor(t / 256) % 256, t % 256)
  end
  return wrk.format("GET", nil, headers)
end
-- $FLOOD_DELAY_MS between a connection's requests on average (0: as fast as possible). The
-- pauses are drawn from an exponential distribution, so the connections' requests arrive as
-- independent clients' would (a Poisson stream), not in lock-step bursts of every connection
-- at once. $FLOOD_LOCKSTEP=1: exactly $FLOOD_DELAY_MS every time (the connections stay in
-- step, and each burst reaches the gateway at once).
local pause = tonumber(os.getenv("FLOOD_DELAY_MS") or "0")
local lockstep = os.getenv("FLOOD_LOCKSTEP") == "1"
if pause > 0 then
  if lockstep then
    delay = function() return pause end
  else
    delay = function() return math.floor(-pause * math.log(1 - math.random()) + 0.5) end
  end
end
