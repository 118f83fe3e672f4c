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

class Jar {
  constructor() { this.cookies = new Map(); }
  take(res) {
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      this.cookies.set(pair.slice(0, i), pair.slice(i + 1));
    }
  }
  header() { return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; '); }
}

async function step(jar, url, init = {}) {
  const res = await fetch(url, { ...init, redirect: 'manual', headers: { ...(init.headers || {}), cookie: jar.header() } });
  jar.take(res);
  return res;
}

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

  let res = await step(jar, auth);
  for (let i = 0; i < 10; i += 1) {
    const location = res.headers.get('location');
    if (!location) throw new Error(`no redirect (status ${res.status}): ${await res.text()}`);
    const next = new URL(location, issuer);
    if (next.href.startsWith(redirect)) {
      const code = next.searchParams.get('code');
      if (!code) throw new Error(`authorization failed: ${next.search}`);
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
    if (next.pathname.startsWith('/interaction/')) {
      const page = await step(jar, next);
      const html = await page.text();
      const prompt = html.includes('name="login"') ? 'login' : 'consent';
      const form = new URLSearchParams(prompt === 'login' ? { prompt, login: user, password: 'any' } : { prompt });
      res = await step(jar, next, { method: 'POST', body: form });
    } else {
      res = await step(jar, next);
    }
  }
  throw new Error('too many redirects');
}

for (let i = 0; i < count; i += 1) {
  const t = await mintOne();
  process.stdout.write(`${JSON.stringify({
    access_token: t.access_token, refresh_token: t.refresh_token, id_token: t.id_token,
    expires_in: t.expires_in, scope: t.scope,
  })}\n`);
}
