// Attach page: a resumable chunked upload. The job is created with the file's name and size,
// then the file goes in chunks (PUT ?offset=N); after a dropped connection the page asks the
// server where the upload stands and sends the rest from there, so a file of several GB is
// never sent twice. Then the job's conversion and filing are polled until done or failed.
// A file, not inline script, so the Content-Security-Policy holds.
(function () {
  'use strict';
  var CHUNK = 8 * 1024 * 1024, POLL_MS = 2000, RETRIES = 30;
  var form = document.getElementById('attach-form');
  if (!form) return;
  var token = document.querySelector('meta[name="csrf-token"]').content;
  var bar = document.getElementById('upload-progress');
  var text = document.getElementById('upload-text');
  var errorBox = document.getElementById('attach-error');
  var project = document.getElementById('a-project');
  var eventSel = document.getElementById('a-event');

  project.addEventListener('change', function () {
    var events = project.selectedOptions[0].dataset.events.split('|');
    eventSel.textContent = '';
    events.forEach(function (e) {
      var o = document.createElement('option'); o.textContent = e; eventSel.appendChild(o);
    });
  });

  function fail(message) {
    errorBox.textContent = message; errorBox.hidden = false;
    document.getElementById('attach-button').disabled = false;
  }
  function request(method, url, body, onProgress) {
    return new Promise(function (resolve, reject) {
      var xhr = new XMLHttpRequest();
      xhr.open(method, url);
      xhr.setRequestHeader('X-CSRF-Token', token);
      xhr.setRequestHeader('Accept', 'application/json');
      if (onProgress) xhr.upload.onprogress = onProgress;
      xhr.onload = function () {
        var data = {};
        try { data = JSON.parse(xhr.responseText); } catch (e) { data = {}; }
        resolve({status: xhr.status, data: data});
      };
      xhr.onerror = xhr.ontimeout = function () { reject(new Error('connection lost')); };
      if (body instanceof Blob) {
        xhr.send(body);
      } else if (body) {
        xhr.setRequestHeader('Content-Type', 'application/json'); xhr.send(JSON.stringify(body));
      } else {
        xhr.send();
      }
    });
  }
  function wait(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }
  function show(done, total, label) {
    bar.max = total || 1; bar.value = done; text.textContent = label;
  }

  async function send(file, job) {
    var offset = job.received || 0, retries = 0;
    while (offset < file.size) {
      var end = Math.min(offset + CHUNK, file.size), start = offset;
      try {
        var r = await request('PUT', '/api/attach/uploads/' + job.id + '?offset=' + start,
          file.slice(start, end), function (ev) {
            show(start + ev.loaded, file.size, Math.floor(100 * (start + ev.loaded) / file.size) + ' %');
          });
        if (r.status === 200) { offset = r.data.received; retries = 0; continue; }
        if (r.status === 409 || (r.status === 400 && 'offset' in r.data)) {
          offset = r.data.offset; continue;
        }
        throw new Error(r.data.detail || ('upload refused (' + r.status + ')'));
      } catch (e) {
        if (e.message !== 'connection lost' || ++retries > RETRIES) throw e;
        show(offset, file.size, 'connection lost; resuming …');
        await wait(Math.min(1000 * retries, 10000));
        try {
          var s = await request('GET', '/api/attach/uploads/' + job.id);
          if (s.status === 200) offset = s.data.received;
        } catch (e2) { /* still down: the next try asks again */ }
      }
    }
  }

  async function follow(jobId) {
    for (;;) {
      var r = await request('GET', '/api/attach/uploads/' + jobId);
      var j = r.data;
      if (j.state === 'done') { show(1, 1, 'done: ' + j.done + ' object(s) attached'); break; }
      if (j.state === 'failed') { show(0, 1, ''); fail(j.reason); break; }
      show(j.done, j.total, j.state + (j.total ? ' ' + j.done + ' of ' + j.total : ' …'));
      await wait(POLL_MS);
    }
    window.setTimeout(function () { window.location.reload(); }, 1500);
  }

  form.addEventListener('submit', async function (ev) {
    ev.preventDefault();
    errorBox.hidden = true;
    var file = document.getElementById('a-file').files[0];
    if (!file) return;
    if (file.size > Number(form.dataset.limit)) { fail(file.name + ' is larger than the upload limit'); return; }
    document.getElementById('attach-button').disabled = true;
    document.getElementById('upload').hidden = false;
    var pathology = {};
    ['specimen', 'block', 'slide', 'stain', 'biopsy'].forEach(function (k) {
      pathology[k] = document.getElementById('a-' + k).value;
    });
    try {
      var r = await request('POST', '/api/attach/uploads', {
        project: project.value, participant: document.getElementById('a-participant').value,
        event: eventSel.value, study: document.getElementById('a-study').value,
        name: file.name, size: file.size, pathology: pathology});
      if (r.status !== 201) throw new Error(r.data.detail || ('refused (' + r.status + ')'));
      await send(file, r.data);
      await follow(r.data.id);
    } catch (e) {
      fail(e.message);
    }
  });
})();
