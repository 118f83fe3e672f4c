// The real OpenID Provider for the end-to-end tests and the quickstart: oidc-provider (npm,
// OpenID-certified) configured the way a Matrix deployment needs it.
//
//   node op.mjs --port 9400 [--host 127.0.0.1] [--issuer URL] [--gateway-secret S] [--bcl-uri URL]
//               [--bcl-sub-only 1] [--dcr-access-ttl SECONDS] [--tls-cert PEM --tls-key PEM]
//               [--compat-callback URL] [--password-grant PASSWORD]
//
// With --tls-cert/--tls-key it serves HTTPS and the issuer is https:// (clients trust the
// certificate themselves: matrix-rust-sdk wants every OP endpoint https unless the homeserver
// is plain http).
//
// - `gateway` is the confidential client the gateway introspects with (client_secret_basic);
//   only it may call the introspection endpoint. With --compat-callback it also signs users in
//   for the gateway's legacy login (docs/compat.md): the authorization-code grant with that
//   redirect URI (the gateway's `/_matrix/gateway/compat/callback`), and back-channel logout to
//   --bcl-uri when given.
//   With --password-grant the `gateway` client may also use the resource-owner password grant
//   (RFC 6749 §4.3, as Keycloak's "direct access grants"): every account's password is
//   PASSWORD, and the tokens are those of the default resource (`urn:matrix:homeserver`) with
//   the device scope the request named.
// - `e2e-client` is a public native client (code + PKCE) that test drivers use to mint tokens
//   (see mint.mjs); `e2e-short` is the same with 3-second access tokens.
// - Dynamic client registration (RFC 7591) is open, as a Matrix client expects of its OP; clients
//   registered that way get access tokens valid for --dcr-access-ttl seconds (default 600), so a
//   test can make an SDK refresh them.
// - Matrix device scopes are not static scopes, so they are admitted through resource
//   indicators: resource `urn:matrix:homeserver` (opaque tokens) or
//   `urn:matrix:homeserver:jwt` (RFC 9068 JWTs) grants the Matrix API scopes plus whatever
//   device scopes the request named.
// - With --bcl-uri, the e2e clients are registered for OIDC Back-Channel Logout at that URL
//   (sessions required), and RP-initiated logout notifies it. With --bcl-sub-only the clients
//   do not require sessions, so logout tokens name the subject alone (no `sid`), as some OPs
//   send them.
// - `POST /test/end-grants?account=ID` ends every grant of that account at the OP, telling no
//   one (no back-channel logout): what an OP administrator's "revoke sessions and consents"
//   does where no logout reaches the relying parties. Refresh tokens of those grants are then
//   refused (`invalid_grant`). Loopback test set-up only.
// - Prints one line `READY <issuer>` on stdout when it listens, then one line
//   `REVOCATION <json of the parameters>` for every request to the revocation endpoint and
//   `TOKEN <grant_type> <status>` for every grant at the token endpoint.
// - Test set-up only: the SSRF guard is lifted (a `fetch` that drops the dispatcher) so the OP
//   can reach the gateway on loopback.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer as createHttpsServer } from 'node:https';
import Provider, { errors as oidcErrors } from 'oidc-provider';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const port = Number(args.port || 9400);
const host = args.host || '127.0.0.1';
const tls = args['tls-cert'] ? { cert: readFileSync(args['tls-cert']), key: readFileSync(args['tls-key']) } : null;
const issuer = args.issuer || `${tls ? 'https' : 'http'}://${host}:${port}`;
const gatewaySecret = args['gateway-secret'] || 'gateway-secret';
const redirect = 'http://127.0.0.1/callback';
const bclUri = args['bcl-uri'];
const bclSessionRequired = !args['bcl-sub-only'];
const dcrAccessTtl = Number(args['dcr-access-ttl'] || 600);
const compatCallback = args['compat-callback'];
const passwordGrant = args['password-grant'];
const STATIC_CLIENTS = new Set(['gateway', 'e2e-client', 'e2e-short']);

const API_SCOPES = [
  'urn:matrix:client:api:*',
  'urn:matrix:client:api:guest',
  'urn:matrix:org.matrix.msc2967.client:api:*',
  'urn:matrix:org.matrix.msc2967.client:api:guest',
];
const DEVICE_PREFIXES = ['urn:matrix:client:device:', 'urn:matrix:org.matrix.msc2967.client:device:'];
const RESOURCES = {
  'urn:matrix:homeserver': 'opaque',
  'urn:matrix:homeserver:jwt': 'jwt',
};

function requestedScopes(ctx) {
  const e = ctx.oidc.entities || {};
  const source = e.AuthorizationCode || e.RefreshToken || e.DeviceCode;
  return (source?.scope || ctx.oidc.params?.scope || '').split(' ').filter(Boolean);
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'op-rsa-1', use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'gateway',
      client_secret: gatewaySecret,
      grant_types: [
        ...(compatCallback ? ['authorization_code'] : []),
        ...(passwordGrant ? ['password'] : []),
        ...(compatCallback || passwordGrant ? ['refresh_token'] : []),
      ],
      response_types: compatCallback ? ['code'] : [],
      redirect_uris: compatCallback ? [compatCallback] : [],
      token_endpoint_auth_method: 'client_secret_basic',
      ...(compatCallback && bclUri ? { backchannel_logout_uri: bclUri, backchannel_logout_session_required: bclSessionRequired } : {}),
    },
    ...['e2e-client', 'e2e-short'].map((id) => ({
      client_id: id,
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: [redirect],
      ...(bclUri ? { backchannel_logout_uri: bclUri, backchannel_logout_session_required: bclSessionRequired } : {}),
    })),
  ],
  jwks: { keys: [signingKey] },
  scopes: ['openid', 'offline_access', ...API_SCOPES],
  claims: { openid: ['sub'], profile: ['name'] },
  cookies: { keys: ['e2e-cookie-key-not-secret'] },
  pkce: { required: () => true },
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
  extraTokenClaims: (ctx, token) => (token.accountId?.startsWith('nouser-') ? undefined : { username: token.accountId }),
  ttl: {
    AccessToken: (ctx, token, client) => {
      if (client?.clientId === 'e2e-short') return 3;
      return client && !STATIC_CLIENTS.has(client.clientId) ? dcrAccessTtl : 600;
    },
    AuthorizationCode: 60,
    RefreshToken: 3600,
    Session: 3600,
    Interaction: 600,
    Grant: 3600,
  },
  issueRefreshToken: (ctx, client, code) => client.grantTypeAllowed('refresh_token'),
  fetch: (url, options) => {
    // Test set-up only: allow loopback targets (the gateway runs on 127.0.0.1).
    const { dispatcher, ...rest } = options;
    return globalThis.fetch(url, rest);
  },
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    introspection: {
      enabled: true,
      allowedPolicy: (ctx, client) => client.clientId === 'gateway',
    },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf || 'urn:matrix:homeserver',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        const format = RESOURCES[resource];
        if (!format) throw new oidcErrors.InvalidTarget();
        const devices = requestedScopes(ctx).filter((s) => DEVICE_PREFIXES.some((p) => s.startsWith(p)));
        return {
          scope: [...API_SCOPES, ...devices].join(' '),
          audience: resource,
          accessTokenFormat: format,
          accessTokenTTL: undefined,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
});
provider.proxy = false;

if (passwordGrant) {
  // The resource-owner password grant, which oidc-provider leaves to the deployment: the
  // password is checked, then a grant, an access token for the Matrix resource and a refresh
  // token are made as the authorization-code grant would make them.
  const { InvalidGrant, InvalidRequest } = oidcErrors;
  provider.registerGrantType('password', async (ctx) => {
    const { username, password, scope = '' } = ctx.oidc.params;
    if (!username || !password) throw new InvalidRequest('username and password are required');
    if (password !== passwordGrant) throw new InvalidGrant('invalid credentials');
    const { client } = ctx.oidc;
    const requested = scope.split(' ').filter(Boolean);
    const matrix = requested.filter((s) => API_SCOPES.includes(s) || DEVICE_PREFIXES.some((p) => s.startsWith(p)));
    const resource = 'urn:matrix:homeserver';
    const grant = new provider.Grant({ accountId: username, clientId: client.clientId });
    if (requested.includes('openid')) grant.addOIDCScope('openid');
    grant.addResourceScope(resource, matrix.join(' '));
    const grantId = await grant.save();
    const at = new provider.AccessToken({ accountId: username, client, grantId, gty: 'password', scope: matrix.join(' ') });
    at.resourceServer = new provider.ResourceServer(resource, {
      scope: matrix.join(' '), audience: resource, accessTokenFormat: 'opaque',
    });
    const rt = new provider.RefreshToken({
      accountId: username, client, grantId, gty: 'password', scope: requested.join(' '), resource, rotations: 0,
    });
    ctx.body = {
      access_token: await at.save(),
      token_type: 'Bearer',
      expires_in: at.expiration,
      refresh_token: await rt.save(),
      scope: at.scope,
    };
  }, ['username', 'password', 'scope']);
}

provider.on('backchannel.error', (ctx, err, client) => {
  process.stderr.write(`BACKCHANNEL_ERROR ${client.clientId}: ${err.message}\n`);
});

const grantsOf = new Map();
provider.on('grant.saved', (grant) => {
  if (!grantsOf.has(grant.accountId)) grantsOf.set(grant.accountId, new Set());
  grantsOf.get(grant.accountId).add(grant.jti);
});

provider.use(async (ctx, next) => {
  if (ctx.path === '/test/end-grants' && ctx.method === 'POST') {
    const account = ctx.query.account;
    let ended = 0;
    for (const id of grantsOf.get(account) || []) {
      const grant = await provider.Grant.find(id);
      if (grant) {
        await grant.destroy();
        ended += 1;
      }
    }
    grantsOf.delete(account);
    ctx.body = { ended };
    return;
  }
  await next();
  if (ctx.path === '/token/introspection' && ctx.method === 'POST') {
    process.stdout.write('INTROSPECTION\n');
  }
  if (ctx.path === '/token' && ctx.method === 'POST' && ctx.oidc?.params?.grant_type) {
    process.stdout.write(`TOKEN ${ctx.oidc.params.grant_type} ${ctx.status}\n`);
  }
  if (ctx.path === '/token/revocation' && ctx.method === 'POST') {
    process.stdout.write(`REVOCATION ${JSON.stringify({ status: ctx.status, params: ctx.oidc?.body ?? null })}\n`);
  }
});

const ready = () => process.stdout.write(`READY ${issuer}\n`);
if (tls) {
  createHttpsServer(tls, provider.callback()).listen(port, host, ready);
} else {
  provider.listen(port, host, ready);
}
