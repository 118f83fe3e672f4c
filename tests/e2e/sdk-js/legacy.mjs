// matrix-js-sdk's legacy sign-in (the path Element Web took before the OAuth 2.0 API, and the
// one older builds and bots still take) through the gateway's compatibility layer: the login
// flows, the single sign-on URL, `m.login.token`, then Matrix traffic with the gateway-issued
// access token, and `/logout`.
//
//   node legacy.mjs --gateway http://127.0.0.1:8008 --users carol,dave --redirect URL
//
// `--redirect` is the client's own URL, on the gateway's `compat.redirect_allowlist`. Prints
// one line per step (`STEP <name> <json>`) and `OK` at the end; exits 1 on any failure.
import { randomBytes } from 'node:crypto';
import { createClient } from 'matrix-js-sdk';
import { logger } from 'matrix-js-sdk/lib/logger.js';
import { authorize } from '../op/browser.mjs';
import { readUntilSeen, syncUntilJoined } from './read.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const baseUrl = (args.gateway || 'http://127.0.0.1:8008').replace(/\/$/, '');
const users = (args.users || 'carol,dave').split(',');
const redirect = args.redirect;

logger.setLevel('warn');
// matrix-js-sdk 43 asks for Node 22 and uses its `Promise.withResolvers` (ES2024); CI has Node 20.
if (!Promise.withResolvers) {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new Promise((ok, fail) => { resolve = ok; reject = fail; });
    return { promise, resolve, reject };
  };
}
const out = (name, value) => process.stdout.write(`STEP ${name} ${JSON.stringify(value)}\n`);
const check = (ok, what) => { if (!ok) throw new Error(what); };

async function status(token) {
  const res = await fetch(`${baseUrl}/_matrix/client/v3/account/whoami`, { headers: { authorization: `Bearer ${token}` } });
  return res.status;
}

// Single sign-on as a legacy client does it: the SDK's SSO URL in the user's browser, the
// login token from the redirect, `m.login.token`.
async function signIn(anonymous, user) {
  const ssoUrl = anonymous.getSsoLoginUrl(redirect, 'sso');
  const landed = new URL(await authorize(ssoUrl, { user, redirect }));
  const loginToken = landed.searchParams.get('loginToken');
  check(loginToken, `no loginToken in ${landed.href}`);
  const login = await anonymous.loginRequest({ type: 'm.login.token', token: loginToken, initial_device_display_name: `e2e legacy ${user}` });
  check(login.access_token && login.device_id && login.user_id, `login answered ${JSON.stringify(login)}`);
  const client = createClient({ baseUrl, accessToken: login.access_token, userId: login.user_id, deviceId: login.device_id });
  const who = await client.whoami();
  check(who.user_id === login.user_id && who.device_id === login.device_id, `whoami: ${JSON.stringify(who)}`);
  out('signed_in', { user, user_id: login.user_id, device_id: login.device_id, compat_token: login.access_token.startsWith('mgc_') });
  return { user, client, loginToken, accessToken: login.access_token, userId: login.user_id, deviceId: login.device_id };
}

try {
  const anonymous = createClient({ baseUrl });
  const { flows } = await anonymous.loginFlows();
  const types = flows.map((f) => f.type);
  const sso = flows.find((f) => f.type === 'm.login.sso');
  check(sso?.oauth_aware_preferred === true, `m.login.sso without oauth_aware_preferred: ${JSON.stringify(flows)}`);
  check(types.includes('m.login.token'), `flows: ${types}`);
  out('flows', { types });

  const [a, b] = [await signIn(anonymous, users[0]), await signIn(anonymous, users[1])];

  // A login token works once.
  try {
    await anonymous.loginRequest({ type: 'm.login.token', token: a.loginToken });
    throw new Error('a used login token was accepted again');
  } catch (e) {
    check(e.httpStatus === 403 && e.errcode === 'M_FORBIDDEN', `a used login token got ${e.httpStatus} ${e.errcode}: ${e.message}`);
    out('login_token_reused', { status: e.httpStatus, errcode: e.errcode });
  }

  // Messaging: a invites b, b joins, a sends, b reads it back and sees the room in its sync.
  const { room_id: roomId } = await a.client.createRoom({ preset: 'private_chat', invite: [b.userId], name: 'e2e legacy js-sdk' });
  await b.client.joinRoom(roomId);
  const body = `hello from ${a.user} ${randomBytes(3).toString('hex')}`;
  await a.client.sendTextMessage(roomId, body);
  const { seen, chunk } = await readUntilSeen(b.client, roomId, body);
  check(seen && seen.sender === a.userId, `${b.user} did not read the message: ${JSON.stringify(chunk.map((e) => e.type))}`);
  const sync = await syncUntilJoined(baseUrl, b.accessToken, roomId);
  check(sync.rooms?.join?.[roomId], `${b.user}'s sync lacks the room`);
  out('message', { room_id: roomId, from: a.userId, read_by: b.userId, body });

  // Sign-out the legacy way: POST /logout with the compat token.
  await a.client.logout(true);
  const refused = await status(a.accessToken);
  check(refused === 401, `the logged-out access token got ${refused}, not 401`);
  const again = await signIn(anonymous, a.user);
  const { devices } = await again.client.getDevices();
  const ids = devices.map((d) => d.device_id);
  check(!ids.includes(a.deviceId), `the logged-out device ${a.deviceId} is still listed upstream: ${ids}`);
  check(ids.includes(again.deviceId), `the new device ${again.deviceId} is not listed upstream: ${ids}`);
  out('logged_out', { user: a.user, old_status: refused, devices: ids });
  process.stdout.write('OK\n');
  process.exit(0);
} catch (e) {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
}
