// Mints real tokens from the e2e OP by driving the authorization-code + PKCE flow headlessly
// (the dev login and consent forms, posted with a cookie jar), exactly as a browser would.
//
//   node mint.mjs --issuer http://127.0.0.1:9400 --user alice \
//       --scope "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01" \
//       [--resource urn:matrix:homeserver] [--client e2e-client] [--count 1] [--jar FILE]
//
// Prints one JSON object per token on stdout: {access_token, refresh_token, id_token,
// expires_in, scope}. With --jar, the browser session (cookies) is saved for logout.mjs.
import { writeFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { authorize, Jar } from './browser.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const issuer = args.issuer || 'http://127.0.0.1:9400';
const user = args.user || 'alice';
const scope = args.scope || 'urn:matrix:client:api:*';
const resource = args.resource || 'urn:matrix:homeserver';
const client = args.client || 'e2e-client';
const count = Number(args.count || 1);
const redirect = 'http://127.0.0.1/callback';

async function mintOne() {
  const jar = new Jar();
  const verifier = randomBytes(32).toString('base64url');
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  const state = randomBytes(8).toString('hex');
  const auth = new URL(`${issuer}/auth`);
  for (const [k, v] of Object.entries({
    client_id: client, response_type: 'code', redirect_uri: redirect, scope: `openid ${scope}`,
    state, code_challenge: challenge, code_challenge_method: 'S256', resource, prompt: 'consent',
  })) auth.searchParams.set(k, v);

  const callback = new URL(await authorize(auth, { user, redirect, jar }));
  const code = callback.searchParams.get('code');
  if (!code) throw new Error(`authorization failed: ${callback.search}`);
  const body = new URLSearchParams({
    grant_type: 'authorization_code', code, redirect_uri: redirect, client_id: client,
    code_verifier: verifier, resource,
  });
  const tok = await fetch(`${issuer}/token`, { method: 'POST', body });
  const json = await tok.json();
  if (!tok.ok) throw new Error(`token endpoint: ${JSON.stringify(json)}`);
  if (args.jar) writeFileSync(args.jar, JSON.stringify({ cookies: [...jar.cookies], id_token: json.id_token }));
  return json;
}

for (let i = 0; i < count; i += 1) {
  const t = await mintOne();
  process.stdout.write(`${JSON.stringify({
    access_token: t.access_token, refresh_token: t.refresh_token, id_token: t.id_token,
    expires_in: t.expires_in, scope: t.scope,
  })}\n`);
}
