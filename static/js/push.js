/* Browser notifications, as progressive enhancement.
 *
 * Loaded by the pages with the opt-in panel (the preferences page, where every sign-in lands,
 * and /push). On each load: if this browser already has a push subscription for the site, make
 * sure the server knows it (re-post when the server's copy differs or is missing). Then: explain first, let the person pick topics, and only then ask
 * the browser for permission and subscribe. Topics can be changed, and notifications stopped,
 * at any time.
 */
(function () {
  'use strict';

  var SW_URL = '/sw.js';
  var SUBSCRIPTIONS = '/push/subscriptions';
  var STATE = '/push/subscription';

  function supported() {
    return 'serviceWorker' in navigator && 'PushManager' in window && 'Notification' in window &&
      window.isSecureContext && window.crypto && window.crypto.subtle;
  }

  function csrfToken() {
    /* The panel's pages carry a meta tag; elsewhere, any form's token (same session). */
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta) return meta.getAttribute('content');
    var input = document.querySelector('input[name="csrf_token"]');
    return input ? input.value : '';
  }

  function hex(buffer) {
    return Array.prototype.map.call(new Uint8Array(buffer), function (b) {
      return ('0' + b.toString(16)).slice(-2);
    }).join('');
  }

  function sha256(text) {
    return crypto.subtle.digest('SHA-256', new TextEncoder().encode(text)).then(hex);
  }

  function keyBytes(base64url) {
    var padded = (base64url + '===').slice(0, base64url.length + (4 - base64url.length % 4) % 4);
    var raw = atob(padded.replace(/-/g, '+').replace(/_/g, '/'));
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  function sendJson(method, url, body) {
    return fetch(url, {
      method: method,
      credentials: 'same-origin',
      headers: {'Content-Type': 'application/json', 'X-CSRFToken': csrfToken()},
      body: JSON.stringify(body)
    }).then(function (response) {
      if (response.status === 204) return {ok: true, status: 204, data: {}};
      return response.json().then(function (data) {
        return {ok: response.ok, status: response.status, data: data};
      }, function () { return {ok: response.ok, status: response.status, data: {}}; });
    });
  }

  function registration() {
    return navigator.serviceWorker.getRegistration('/').then(function (reg) {
      return reg || navigator.serviceWorker.register(SW_URL, {scope: '/'});
    }).then(function () { return navigator.serviceWorker.ready; });
  }

  function existingSubscription() {
    return navigator.serviceWorker.getRegistration('/').then(function (reg) {
      return reg ? reg.pushManager.getSubscription() : null;
    });
  }

  /* What the server knows of this subscription; re-post when it differs. */
  function resync(subscription, topicsIfUnknown) {
    var json = subscription.toJSON();
    return Promise.all([
      sha256(json.endpoint),
      sha256(json.keys.p256dh + '.' + json.keys.auth)
    ]).then(function (hashes) {
      return fetch(STATE + '?endpoint_hash=' + hashes[0], {credentials: 'same-origin'})
        .then(function (r) { return r.ok ? r.json() : {known: false}; })
        .then(function (server) {
          var body = {subscription: json};
          if (!server.known) {
            if (!topicsIfUnknown) return server;
            body.topics = topicsIfUnknown;
          } else if (server.active && server.mine && server.keys_hash === hashes[1]) {
            return server;
          }
          return sendJson('POST', SUBSCRIPTIONS, body).then(function (result) {
            return result.ok ? {known: true, active: true, mine: true,
                                topics: result.data.topics} : server;
          });
        });
    });
  }

  function Panel(root) {
    this.root = root;
    this.form = root.querySelector('[data-push-form]');
    this.status = root.querySelector('[data-push-status]');
    this.messages = root.querySelector('[data-push-messages]');
    this.key = root.getAttribute('data-vapid-key');
  }

  Panel.prototype.show = function (selector, visible) {
    var el = this.root.querySelector(selector);
    if (el) el.hidden = !visible;
  };

  Panel.prototype.say = function (name) {
    this.status.textContent = this.messages.getAttribute('data-msg-' + name) || '';
  };

  Panel.prototype.picked = function () {
    return Array.prototype.map.call(
      this.form.querySelectorAll('input[name="push_topic"]:checked'),
      function (input) { return input.value; });
  };

  Panel.prototype.tick = function (topics) {
    Array.prototype.forEach.call(this.form.querySelectorAll('input[name="push_topic"]'),
      function (input) {
        input.checked = topics.indexOf(input.value) !== -1;
        /* Keep the preference matrix on the same page in step. */
        var cell = document.querySelector('input[name="c:' + input.value + ':web_push"]');
        if (cell) cell.checked = input.checked;
      });
  };

  Panel.prototype.subscribedView = function (on) {
    this.show('[data-push-intro]', !on);
    this.form.hidden = !on;
    this.show('[data-push-enable]', !on);
    this.show('[data-push-next]', !on);
    this.show('[data-push-save]', on);
    this.show('[data-push-leave]', on);
  };

  Panel.prototype.start = function () {
    var panel = this;
    this.show('[data-push-nojs]', false);
    if (!supported()) { this.show('[data-push-unsupported]', true); return; }
    if (Notification.permission === 'denied') this.show('[data-push-denied]', true);
    this.subscribedView(false);
    this.root.querySelector('[data-push-start]').addEventListener('click', function () {
      panel.show('[data-push-intro]', false);
      panel.form.hidden = false;
      var first = panel.form.querySelector('input[name="push_topic"]');
      if (first) first.focus();
    });
    this.form.addEventListener('submit', function (event) {
      event.preventDefault();
      panel.enableOrSave();
    });
    this.root.querySelector('[data-push-leave]').addEventListener('click', function () {
      panel.leave();
    });
    existingSubscription().then(function (sub) {
      if (!sub || Notification.permission !== 'granted') return;
      return resync(sub, panel.picked()).then(function (server) {
        if (server && server.known && server.mine && server.active) {
          panel.tick(server.topics || []);
          panel.subscribedView(true);
        }
      });
    }).catch(function () { /* stay on the soft prompt */ });
  };

  Panel.prototype.enableOrSave = function () {
    var panel = this;
    var topics = this.picked();
    var saving = !this.root.querySelector('[data-push-save]').hidden;
    if (!saving && topics.length === 0) { this.say('pick'); return; }
    var ask = saving ? Promise.resolve(Notification.permission)
      : Promise.resolve(Notification.requestPermission());
    ask.then(function (permission) {
      if (permission !== 'granted') {
        panel.show('[data-push-denied]', true);
        return null;
      }
      panel.show('[data-push-denied]', false);
      return registration().then(function (reg) {
        return reg.pushManager.getSubscription().then(function (sub) {
          return sub || reg.pushManager.subscribe({
            userVisibleOnly: true, applicationServerKey: keyBytes(panel.key)
          });
        });
      }).then(function (sub) {
        return sendJson('POST', SUBSCRIPTIONS, {subscription: sub.toJSON(), topics: topics});
      }).then(function (result) {
        if (result.status === 409) { panel.say('account'); return; }
        if (!result.ok) { panel.say('error'); return; }
        panel.tick(result.data.topics || []);
        panel.subscribedView(true);
        panel.say(saving ? 'saved' : 'on');
      });
    }).catch(function () { panel.say('error'); });
  };

  Panel.prototype.leave = function () {
    var panel = this;
    existingSubscription().then(function (sub) {
      if (!sub) { panel.subscribedView(false); panel.say('off'); return; }
      var endpoint = sub.endpoint;
      return sendJson('DELETE', SUBSCRIPTIONS, {endpoint: endpoint}).then(function () {
        return sub.unsubscribe();
      }).then(function () {
        panel.subscribedView(false);
        panel.say('off');
      });
    }).catch(function () { panel.say('error'); });
  };

  function init() {
    var root = document.querySelector('[data-push-panel]');
    if (root && root.querySelector('[data-push-form]')) {
      new Panel(root).start();
      return;
    }
    /* Any other page: re-sync a subscription this browser already has. */
    if (!supported() || Notification.permission !== 'granted') return;
    existingSubscription().then(function (sub) {
      if (sub) return resync(sub, null);
    }).catch(function () { /* nothing to do */ });
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', init);
  } else {
    init();
  }
})();
