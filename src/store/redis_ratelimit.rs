//! Rate limits in Redis: the GCRA of [`super::ratelimit`] as one Lua script, so that the read
//! and the update of a bucket are one atomic step for every replica sharing the Redis.
//!
//! One key per bucket, `portcullis:rl:{<key>}`, holding the TAT in microseconds of the Redis
//! server's clock, with a `PX` that drops it once the bucket is full again. A script touches
//! only that key, so it runs on the one node that owns it in a cluster; the braces make the
//! whole key the hash tag, so that keys differing only in a suffix added later would stay on
//! one slot. The script is sent with `EVALSHA`, and with `EVAL` after a NOSCRIPT reply.
//!
//! A check is one command, written at most once (see [`super::redis`]): a reply lost after
//! Redis ran the script counts the request without letting it through, which errs on the safe
//! side.

use std::time::Duration;

use super::ratelimit::{burst_us, emission_us, refuse_all, RateDecision, RateLimiter};
use super::redis::{LuaScript, RedisConnection};
use super::StoreError;

/// KEYS[1]: the bucket. ARGV: emission interval (us), burst tolerance (us: `limit` emission
/// intervals), limit.
/// Returns {allowed (0/1), remaining, reset_after (us), retry_after (us)}.
const GCRA: &str = r"
local e = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored) or now, now)
end
local new_tat = tat + e
local allow_at = new_tat - w
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
local remaining = math.floor((now + w - new_tat) / e)
if remaining > limit - 1 then
  remaining = limit - 1
end
return {1, remaining, new_tat - now, 0}
";

/// Rate limits shared by every replica on one Redis (standalone, Sentinel or Cluster).
#[derive(Debug)]
pub struct RedisRateLimiter {
    connection: RedisConnection,
    script: LuaScript,
}

impl RedisRateLimiter {
    /// A limiter on an existing connection.
    pub fn new(connection: RedisConnection) -> Self {
        Self {
            connection,
            script: LuaScript::new(GCRA),
        }
    }

    /// Parses `url` and starts connecting; see [`RedisConnection::connect`].
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self::new(RedisConnection::connect(url, timeout).await?))
    }
}

/// Microseconds from a script reply, which are never negative.
fn micros(value: i64) -> Duration {
    Duration::from_micros(u64::try_from(value).unwrap_or(0))
}

#[async_trait::async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(
        &self,
        key: &str,
        limit: u64,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        if limit == 0 {
            return Ok(refuse_all(window));
        }
        let reply: Vec<i64> = self
            .connection
            .run_script(
                &self.script,
                vec![format!("portcullis:rl:{{{key}}}")],
                vec![
                    emission_us(limit, window).to_string(),
                    burst_us(limit, window).to_string(),
                    limit.to_string(),
                ],
            )
            .await?;
        let [allowed, remaining, reset_after, retry_after] = reply[..] else {
            return Err(StoreError::Refused {
                reason: format!(
                    "the rate-limit script returned {} values, not 4",
                    reply.len()
                ),
            });
        };
        Ok(RateDecision {
            allowed: allowed == 1,
            limit,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset_after: micros(reset_after),
            retry_after: (allowed != 1).then(|| micros(retry_after)),
        })
    }
}
