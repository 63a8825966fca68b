/* Carnet's service worker, served at /sw.js with scope "/".
 *
 * Shows the notifications Carnet sends (the server already picked the recipient's language),
 * reports displays and clicks (push services give no receipts), and tells the server when the
 * browser replaces the subscription. That renewal is held to what subscribing asks (the CSRF
 * token, and the old subscription being this browser's or the signed-in customer's): having
 * no page to read the token from, the worker fetches it from /push/csrf-token, same-origin
 * with the browser's cookies. A renewal the server refuses is repaired by the page's re-sync.
 */
'use strict';

self.addEventListener('install', function () { self.skipWaiting(); });
self.addEventListener('activate', function (event) { event.waitUntil(self.clients.claim()); });

function hex(buffer) {
  return Array.prototype.map.call(new Uint8Array(buffer), function (b) {
    return ('0' + b.toString(16)).slice(-2);
  }).join('');
}

function endpointHash() {
  return self.registration.pushManager.getSubscription().then(function (sub) {
    if (!sub) return null;
    return crypto.subtle.digest('SHA-256', new TextEncoder().encode(sub.endpoint)).then(hex);
  });
}

function beacon(kind, messageId) {
  if (!messageId) return Promise.resolve();
  return endpointHash().then(function (hash) {
    if (!hash) return;
    return fetch('/push/beacons', {
      method: 'POST',
      credentials: 'omit',
      keepalive: true,
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({message: messageId, subscription: hash, event: kind})
    });
  }).catch(function () { /* a lost beacon only makes the counts lower */ });
}

function safeUrl(url) {
  try {
    var target = new URL(url || '/', self.location.origin);
    return (target.protocol === 'https:' || target.protocol === 'http:') ? target.href : '/';
  } catch (e) {
    return '/';
  }
}

self.addEventListener('push', function (event) {
  var data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch (e) {
    data = {body: event.data ? event.data.text() : ''};
  }
  var options = {
    body: data.body || '',
    icon: data.icon || undefined,
    tag: data.tag || undefined,
    data: {id: data.id || null, url: safeUrl(data.url)}
  };
  event.waitUntil(
    self.registration.showNotification(data.title || 'Carnet', options)
      .then(function () { return beacon('displayed', data.id); })
  );
});

self.addEventListener('notificationclick', function (event) {
  var data = event.notification.data || {};
  event.notification.close();
  event.waitUntil(Promise.all([
    beacon('clicked', data.id),
    self.clients.matchAll({type: 'window', includeUncontrolled: true}).then(function (list) {
      for (var i = 0; i < list.length; i++) {
        if (list[i].url === data.url && 'focus' in list[i]) return list[i].focus();
      }
      return self.clients.openWindow(data.url || '/');
    })
  ]));
});

function csrfToken() {
  return fetch('/push/csrf-token', {credentials: 'same-origin', cache: 'no-store'})
    .then(function (response) { return response.ok ? response.json() : {}; })
    .then(function (data) { return data.csrf_token || ''; });
}

self.addEventListener('pushsubscriptionchange', function (event) {
  var old = event.oldSubscription;
  var renewed = event.newSubscription
    ? Promise.resolve(event.newSubscription)
    : self.registration.pushManager.subscribe(old ? old.options : {userVisibleOnly: true});
  event.waitUntil(renewed.then(function (sub) {
    if (!old || !sub) return;
    return csrfToken().then(function (token) {
      return fetch('/push/subscriptions/renew', {
        method: 'POST',
        credentials: 'same-origin',
        headers: {'Content-Type': 'application/json', 'X-CSRFToken': token},
        body: JSON.stringify({old_endpoint: old.endpoint, subscription: sub.toJSON()})
      });
    });
  }).catch(function () { /* the next page load re-syncs */ }));
});
