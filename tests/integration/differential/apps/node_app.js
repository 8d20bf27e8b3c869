// The Node app of the differential tests: node's http module and the tiny router small
// services write on top of it. It reads the URL the naive way (new URL, then
// decodeURIComponent), trusts forwarding headers as Express does with `trust proxy`
// (X-Forwarded-Host names the host), honours X-HTTP-Method-Override as the
// method-override middleware does, and matches paths case-sensitively with an optional
// trailing slash (Express's default `strict: false`). Every handler answers what it
// served and every identity header it saw, in both spellings ("-" and "_"), which node
// keeps apart.
'use strict';
const http = require('http');

const HEADERS = [
  'x-client-spiffe-id',
  'x-forwarded-client-cert',
  'client-cert',
  'x-forwarded-for',
  'x-forwarded-host',
  'forwarded',
  'x-original-url',
  'x-rewrite-url',
  'x-real-ip',
  'x-http-method-override',
];

function answer(res, status, body) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': data.length });
  res.end(data);
}

function route(req) {
  const host = req.headers['x-forwarded-host'] || req.headers.host || '';
  const url = new URL(req.url, 'http://' + host);
  const path = decodeURIComponent(url.pathname);
  const method = (req.headers['x-http-method-override'] || req.method).toUpperCase();
  const p = path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path;
  let resource;
  if (url.hostname === 'admin.internal') resource = 'admin-vhost';
  else if (p === '/admin' || p.startsWith('/admin/')) resource = 'admin';
  else if (p === '/secret') resource = 'secret';
  else if (p === '/a+b@c') resource = 'plus-at';
  else if (p === '/api/invoices') resource = method === 'POST' ? 'invoices-post' : null;
  else resource = 'public';
  return { resource, method, path, host: url.host };
}

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    let seen;
    try {
      seen = route(req);
    } catch (e) {
      answer(res, 400, { server: 'node', error: String(e) });
      return;
    }
    if (seen.resource === null) {
      answer(res, 405, { server: 'node', error: 'method not allowed' });
      return;
    }
    const headers = {};
    for (const name of HEADERS) {
      headers[name] = req.headersDistinct[name] || [];
      const underscored = name.replace(/-/g, '_');
      headers[underscored] = req.headersDistinct[underscored] || [];
    }
    answer(res, 200, { server: 'node', ...seen, headers });
  });
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
