// matrix-js-sdk (the SDK behind Element Web) against the gateway, the way Element Web uses it:
// server discovery from the server name, the homeserver's OAuth 2.0 metadata, dynamic client
// registration at the OP, the authorization-code grant with PKCE (the OP's sign-in pages driven
// by the headless browser of ../op/browser.mjs), then Matrix traffic with the SDK's own client:
// whoami, two users messaging in a room, the access token refreshed by the SDK, and the SDK's
// logout (for an OAuth 2.0-native session: both tokens revoked at the advertised endpoint).
//
//   node flow.mjs --server-name localhost --gateway http://127.0.0.1:8008 --users alice,bob
//                 [--expires-in 4]
//
// Prints one line per step (`STEP <name> <json>`) and `OK` at the end; exits 1 with the error
// on any failure. `https://<server-name>` is served by the gateway: the SDK's fetch for the
// server name is pointed there (what DNS and TLS do in a deployment).
import { randomBytes } from 'node:crypto';
import {
  AutoDiscovery, AutoDiscoveryAction, createClient, MatrixError,
} from 'matrix-js-sdk';
import { OAuth2 } from 'matrix-js-sdk/lib/oauth/index.js';
import { logger } from 'matrix-js-sdk/lib/logger.js';
import { authorize } from '../op/browser.mjs';
import { readUntilSeen } from './read.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const serverName = args['server-name'] || 'localhost';
const gateway = (args.gateway || 'http://127.0.0.1:8008').replace(/\/$/, '');
const users = (args.users || 'alice,bob').split(',');
const expiresIn = Number(args['expires-in'] || 4);
const REDIRECT = 'http://127.0.0.1/callback';

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
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const check = (ok, what) => { if (!ok) throw new Error(what); };

// The server name resolves to the gateway.
const serverFetch = (url, init) => {
  const u = new URL(url);
  const target = u.origin === `https://${serverName}` ? `${gateway}${u.pathname}${u.search}` : u.href;
  return fetch(target, init);
};
AutoDiscovery.setFetchFn(serverFetch);

async function discover() {
  const found = await AutoDiscovery.findClientConfig(serverName);
  const hs = found['m.homeserver'];
  check(hs?.state === AutoDiscoveryAction.SUCCESS, `server discovery failed: ${JSON.stringify(found)}`);
  return hs.base_url;
}

// Sign-in as Element Web does it; returns the SDK client and what the test needs of the session.
async function signIn(user, baseUrl) {
  const anonymous = createClient({ baseUrl });
  const metadata = await anonymous.getAuthMetadata();
  const clientId = await OAuth2.registerClient(metadata, {
    client_name: `e2e js-sdk ${user}`,
    client_uri: 'http://127.0.0.1/',
    redirect_uris: [REDIRECT],
    application_type: 'native',
  });
  const deviceId = `JS${randomBytes(5).toString('hex').toUpperCase()}`;
  const oauth = new OAuth2(metadata, { clientId, deviceId });
  const state = randomBytes(8).toString('hex');
  const url = await oauth.generateAuthorizationCodeGrantUrl(state, REDIRECT);
  const callback = new URL(await authorize(url, { user, redirect: REDIRECT }));
  const params = new URLSearchParams(callback.hash.slice(1) || callback.search.slice(1));
  check(params.get('state') === state, `state mismatch in ${callback.href}`);
  check(params.get('code'), `no code in ${callback.href}`);
  const tokens = await oauth.completeAuthorizationCodeGrant(params.get('code'), REDIRECT);
  check(tokens.refresh_token, 'the OP issued no refresh token');
  const session = { user, deviceId, refreshes: 0, accessToken: tokens.access_token, refreshToken: tokens.refresh_token };
  // An OAuth 2.0-native session: the SDK refreshes the tokens itself and revokes them on logout.
  session.client = createClient({
    baseUrl,
    accessToken: tokens.access_token,
    refreshToken: tokens.refresh_token,
    deviceId,
    oauthClientId: clientId,
    onTokenRefresh: (t) => {
      session.refreshes += 1;
      session.accessToken = t.accessToken;
      session.refreshToken = t.refreshToken;
    },
  });
  const who = await session.client.whoami();
  check(who.device_id === deviceId, `whoami names device ${who.device_id}, not ${deviceId}`);
  session.userId = who.user_id;
  out('signed_in', { user, user_id: who.user_id, device_id: who.device_id, client_id: clientId,
    registration_endpoint: metadata.registration_endpoint, revocation_endpoint: metadata.revocation_endpoint });
  return session;
}

async function status(baseUrl, token) {
  const res = await fetch(`${baseUrl}/_matrix/client/v3/account/whoami`, { headers: { authorization: `Bearer ${token}` } });
  return res.status;
}

try {
  const baseUrl = await discover();
  out('discovered', { base_url: baseUrl });
  const [a, b] = [await signIn(users[0], baseUrl), await signIn(users[1], baseUrl)];

  // Messaging: a invites b to a room, b joins, a sends, b reads it back.
  const { room_id: roomId } = await a.client.createRoom({ preset: 'private_chat', invite: [b.userId], name: 'e2e js-sdk' });
  await b.client.joinRoom(roomId);
  const body = `hello from ${a.user} ${randomBytes(3).toString('hex')}`;
  await a.client.sendTextMessage(roomId, body);
  const { seen, chunk } = await readUntilSeen(b.client, roomId, body);
  check(seen && seen.sender === a.userId, `${b.user} did not read the message: ${JSON.stringify(chunk.map((e) => e.type))}`);
  out('message', { room_id: roomId, from: a.userId, read_by: b.userId, body });

  // Refresh: once the access token has expired, the SDK refreshes it and the session goes on.
  const before = a.refreshes;
  await sleep((expiresIn + 1.5) * 1000);
  const who = await a.client.whoami();
  check(who.device_id === a.deviceId, 'the device changed across the refresh');
  check(a.refreshes > before, 'the SDK did not refresh the expired access token');
  out('refreshed', { user: a.user, refreshes: a.refreshes, device_id: who.device_id });

  // Sign-out as Element Web does it: the SDK revokes both tokens at the advertised endpoint.
  const oldAccess = a.accessToken;
  await a.client.logout(true);
  const refused = await status(baseUrl, oldAccess);
  check(refused === 401, `the revoked access token got ${refused}, not 401`);
  // The homeserver no longer has the device: a fresh session of a's lists a's devices.
  const again = await signIn(a.user, baseUrl);
  const { devices } = await again.client.getDevices();
  const ids = devices.map((d) => d.device_id);
  check(!ids.includes(a.deviceId), `the signed-out device ${a.deviceId} is still listed upstream: ${ids}`);
  check(ids.includes(again.deviceId), `the new device ${again.deviceId} is not listed upstream: ${ids}`);
  out('signed_out', { user: a.user, device_id: a.deviceId, old_token_status: refused, devices_upstream: ids });
  for (const s of [b, again]) s.client.stopClient();
  process.stdout.write('OK\n');
  process.exit(0);
} catch (e) {
  const detail = e instanceof MatrixError ? `${e.httpStatus} ${e.errcode} ${e.message}` : (e?.stack || String(e));
  process.stderr.write(`FAILED: ${detail}\n`);
  process.exit(1);
}
