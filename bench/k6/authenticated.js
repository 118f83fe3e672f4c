// k6 load test of the authenticated path, for teams that use k6.
//   TOKENS_FILE=tokens.txt GATEWAY=http://127.0.0.1:8008 k6 run bench/k6/authenticated.js
// Mint tokens first: bench/loadtest.sh --mint-only (or your OP's device grant).
import http from 'k6/http';
import { check } from 'k6';
import { SharedArray } from 'k6/data';

const tokens = new SharedArray('tokens', () =>
  open(__ENV.TOKENS_FILE).split('\n').filter((t) => t.length > 0));
const gateway = __ENV.GATEWAY || 'http://127.0.0.1:8008';

export const options = {
  vus: Number(__ENV.VUS || 64),
  duration: __ENV.DURATION || '30s',
  thresholds: { http_req_failed: ['rate<0.01'] },
};

export default function () {
  const token = tokens[(__VU * 7919 + __ITER) % tokens.length];
  const res = http.get(`${gateway}/_matrix/client/v3/account/whoami`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  check(res, { 'status is 200': (r) => r.status === 200 });
}
