// Exports page: the project choice reloads the study list, and the exports being made show
// their progress live (GET /api/exports) until they are ready or failed. A file, not inline
// script, so the Content-Security-Policy holds; without JavaScript the page shows the state
// as of its last load.
(function () {
  'use strict';
  var POLL_MS = 2000;

  var project = document.getElementById('f-project');
  if (project) {
    project.addEventListener('change', function () {
      // another project: its participants and events differ, so the filters start over
      ['f-participant', 'f-event', 'f-since', 'f-until'].forEach(function (id) {
        var el = document.getElementById(id);
        if (el) el.disabled = true;
      });
      document.getElementById('export-filter').submit();
    });
  }

  var table = document.getElementById('jobs');
  if (!table) return;

  function when(value) {  // as the pages' `when` filter: 2025-06-14 05:30
    var m = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d)/.exec(value || '');
    return m ? m[1] + ' ' + m[2] : (value || '');
  }
  function minutes(seconds) {
    return seconds < 90 ? 'about a minute' : 'about ' + Math.round(seconds / 60) + ' minutes';
  }
  function link(href, cls, label) {
    var a = document.createElement('a');
    a.href = href; a.className = cls; a.textContent = label;
    return a;
  }

  function update(row, j) {
    row.className = 'job ' + j.state;
    var badge = document.createElement('span');
    badge.className = 'badge ' + j.state; badge.textContent = j.state;
    row.querySelector('td.state').replaceChildren(badge);
    var bar = row.querySelector('progress');
    if (j.total) { bar.max = j.total; bar.value = j.done; }
    else if (!j.open) { bar.max = 1; bar.value = 1; }
    else { bar.removeAttribute('value'); }
    row.querySelector('.progress-text').textContent = !j.open ? '' :
      j.total ? j.done + ' of ' + j.total : (j.done ? j.done + ' images' : '');
    var note = row.querySelector('.note');
    note.textContent = j.state === 'failed' ? j.reason : j.waiting ? j.waiting :
      j.open && j.remaining !== null ? minutes(j.remaining) + ' left' :
      j.open && j.estimate !== null ? 'usually takes ' + minutes(j.estimate) : '';
    row.querySelector('td.expires').textContent = j.state === 'ready' ? when(j.expires) : '';
    var cell = row.querySelector('td.download');
    if (j.download && !cell.querySelector('a')) {
      var zip = link(j.download.zip, 'download-zip', 'Download');
      zip.setAttribute('download', '');
      cell.replaceChildren(zip, ' ', link(j.download.sha256, 'download-sha256', 'SHA-256'),
                           ' ', link(j.download.manifest, 'download-manifest', 'manifest'));
    } else if (!j.download) {
      cell.replaceChildren();
    }
  }

  function open() {
    return table.querySelector('tr.job.queued, tr.job.retrieving, tr.job.converting, tr.job.packing');
  }

  var timer = null;
  function poll() {
    if (document.hidden) return;
    // X-Fiona-Poll: a poll does not count as activity, so the session still ends when idle
    fetch(table.dataset.pollExports, {headers: {'Accept': 'application/json', 'X-Fiona-Poll': '1'},
                                      credentials: 'same-origin'})
      .then(function (r) { if (r.ok) return r.json(); throw new Error(r.status); })
      .then(function (jobs) {
        jobs.forEach(function (j) {
          var row = document.getElementById('job-' + j.id);
          if (row) update(row, j);
        });
        if (!open()) { window.clearInterval(timer); timer = null; }
      })
      .catch(function () { /* a failed poll changes nothing; the next one tries again */ });
  }
  if (open()) timer = window.setInterval(poll, POLL_MS);
})();
