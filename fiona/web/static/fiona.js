// FIONA pages: a confirm <dialog> for forms that need a second thought, and live updates of
// request and daemon status. A file, not inline script, so the Content-Security-Policy holds.
// Without JavaScript the pages still work: confirm forms open a confirmation page, and the
// status shows as of the last load.
(function () {
  'use strict';
  var POLL_MS = 5000;

  // --- confirm dialog -----------------------------------------------------------------------
  var dialog = document.getElementById('confirm-dialog');
  function confirmFirst(ev) {
    var form = ev.target;
    if (!dialog || typeof dialog.showModal !== 'function') return;  // the fallback page
    ev.preventDefault();
    var post = document.getElementById('confirm-dialog-form');
    var fields = document.getElementById('confirm-dialog-fields');
    post.action = form.dataset.post;
    fields.replaceChildren();
    form.querySelectorAll('input[type=hidden]').forEach(function (input) {
      var copy = document.createElement('input');
      copy.type = 'hidden'; copy.name = input.name; copy.value = input.value;
      fields.appendChild(copy);
    });
    document.getElementById('confirm-dialog-question').textContent = form.dataset.question;
    document.getElementById('confirm-dialog-yes').textContent = form.dataset.yes;
    dialog.showModal();
  }
  document.querySelectorAll('form.confirm-form').forEach(function (form) {
    form.addEventListener('submit', confirmFirst);
  });
  var cancel = document.getElementById('confirm-dialog-cancel');
  if (cancel) cancel.addEventListener('click', function () { dialog.close(); });

  // --- live status ----------------------------------------------------------------------------
  function get(url, then) {
    if (document.hidden) return;
    // X-Fiona-Poll: a poll does not count as activity, so the session still ends when idle
    fetch(url, {headers: {'Accept': 'application/json', 'X-Fiona-Poll': '1'},
                credentials: 'same-origin'})
      .then(function (r) { if (r.ok) return r.json(); throw new Error(r.status); })
      .then(then)
      .catch(function () { /* a failed poll changes nothing; the next one tries again */ });
  }
  function badge(cell, text) {
    if (!cell) return;
    var span = document.createElement('span');
    span.className = 'badge ' + text; span.textContent = text;
    cell.replaceChildren(span);
  }
  function text(cell, value) { if (cell) cell.textContent = value || ''; }
  function when(value) {  // as the pages' `when` filter: 2025-06-14 05:30
    var m = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d)/.exec(value || '');
    return m ? m[1] + ' ' + m[2] : (value || '');
  }

  function pollRequests(table) {
    get(table.dataset.poll, function (requests) {
      requests.forEach(function (r) {
        var row = table.querySelector('tr.request[data-key="' + CSS.escape(r.project + '/' + r.instance) + '"]');
        if (!row) return;
        row.className = 'request ' + r.status;
        badge(row.querySelector('td.status'), r.status);
        text(row.querySelector('td.transferred'), when(r.transferred));
        text(row.querySelector('td.mapped'), r.mapped_uid);
        text(row.querySelector('td.error-message'), r.error_message);
      });
    });
  }

  function pollStatus(root) {
    get(root.dataset.poll, function (s) {
      s.daemons.forEach(function (d) {
        var row = root.querySelector('#daemons tr[data-name="' + CSS.escape(d.name) + '"]');
        if (!row) return;
        row.className = 'daemon ' + (d.running ? 'running' : 'failed');
        badge(row.querySelector('td.state'), d.running ? 'running' : 'stopped');
        text(row.querySelector('td.pid'), d.pid);
        text(row.querySelector('td.last-activity'), when(d.last_activity));
      });
      text(document.getElementById('studies-waiting'), String(s.queues.studies_waiting));
      text(document.getElementById('requests-pending'), String(s.queues.requests_pending));
      text(document.getElementById('requests-failed'), String(s.queues.requests_failed));
      text(document.getElementById('disk-used'), String(s.disk.used_percent));
      text(document.getElementById('disk-free'), String(s.disk.free_gb));
      badge(document.getElementById('disk-state'), s.disk.state);
      s.switches.forEach(function (w) {
        var row = root.querySelector('#switches tr[data-part="' + CSS.escape(w.part) + '"]');
        var shown = row && row.dataset.enabled === '1';
        if (row && shown !== w.enabled) window.location.reload();  // its button must flip too
      });
    });
  }

  document.querySelectorAll('[data-poll]').forEach(function (el) {
    var poll = el.dataset.pollKind === 'status' ? pollStatus : pollRequests;
    window.setInterval(function () { poll(el); }, POLL_MS);
  });
})();
